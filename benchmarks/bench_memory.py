"""Peak memory (RSS) and wall time of mechicl's commands at their defaults, beside the model alone.

    python benchmarks/bench_memory.py [--model gemma3-270m] [--commands load,patch,heads,report] [--rows FILE]
    python benchmarks/bench_memory.py --model smollm2-135m --commands load,findings:all   # one cell per task

Each command runs as its own subprocess (``.venv/bin/mechicl <command> --model M --threads 1
--out <temp dir>``, default sizes otherwise); its peak resident set size is the child's
``ru_maxrss`` from ``os.wait4`` (the child alone, not this process), next to its wall time.
``load`` is a subprocess that only loads the model (``mechicl.models.loading.load_model``) and
reports its RSS after the load and its peak during it. ``peak - load RSS`` is what the command
adds on top of the weights. Run files go to a temporary folder that is deleted afterwards.
Pick commands with ``--commands`` to keep one locked run short (on gemma3-270m here: patch 11 min,
heads 4.5 min with the old finder, before issue 26). ``heads-stages`` runs the held-out head finder
(``mechicl heads``' defaults: one findings cell) in one child with the peak RSS of each stage (the
ablations' steppers, the screen's first-order estimate, the exact ablations, the zero-shot check), to say
what dominates ``heads``' peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from _common import add_row

ROOT = Path(__file__).resolve().parents[1]
# every command that runs a model at its defaults (``mechicl <name> --model M --threads 1 --out DIR``)
COMMANDS = (
    "demo", "behavior", "attention", "lens", "dla", "prior", "patch", "heads", "attribute", "report", "circuit",
    "aggregate",
)  # fmt: skip
# `prior` needs label heads (no default): the validated ones the docs name (README "Findings"; docs/commands.md)
PRIOR_HEADS = {"gemma3-270m": "L11H2;L15H0", "smollm2-135m": "L18H7"}
LOAD = """
import sys, torch
torch.set_num_threads(1)
from mechicl.models.loading import load_model
loaded = load_model(sys.argv[1])  # keep the reference: a dropped model is freed before RSS is read
status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)
print('RSS_KB', status['VmRSS'].split()[0], status['VmHWM'].split()[0])
"""

STAGES = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, 'benchmarks')
from _common import reset_peak, rss_mb
import mechicl.analysis.heads.finder as finder
from mechicl.analysis.heads.ablation import HeadAblation
from mechicl.data.tasks import load_task
from mechicl.models.loading import load_model
from mechicl.runs.heads import find_heads_for, preset_config

peaks, depth = {}, [0]

def wrap(owner, attr, stage):
    fn = getattr(owner, attr)
    def w(*a, **k):
        depth[0] += 1
        if depth[0] == 1:
            reset_peak()
        try:
            return fn(*a, **k)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                peaks[stage] = max(peaks.get(stage, 0.0), rss_mb('VmHWM'))
    setattr(owner, attr, w)

wrap(HeadAblation, '__init__', 'HeadAblation steppers (prefix runs of a stage, both renderings)')
wrap(HeadAblation, 'attribution', 'screen: first-order estimate (1 backward per rendering)')
wrap(HeadAblation, 'scores', 'screen + confirm + validate: exact ablations')
wrap(finder, '_zero_shot_effect', 'validate: zero-shot check')
loaded = load_model(sys.argv[1])
print('STAGE', 'model loaded (RSS now)', rss_mb())
find_heads_for(loaded, load_task('vader-words'), preset_config(), progress=False)
for k, v in peaks.items():
    print('STAGE', k, v)
"""


def run_child(cmd: list[str], preexec: Any = None) -> tuple[float, float, str]:
    """``(wall seconds, peak RSS in MB, stdout)`` of one child process (its own ``ru_maxrss``), one torch thread;
    raises if it fails. ``preexec``: run in the child before ``cmd`` (``bench_slow_core`` joins a CPU-quota group)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fo, stderr=fe, text=True, preexec_fn=preexec)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage (Popen.wait would discard it)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0), fe.seek(0)
        out, err = fo.read(), fe.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, usage.ru_maxrss * 1024 / 1e6, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument(
        "--commands",
        default="load,patch,heads,report",
        help=f"comma list of load, {', '.join(COMMANDS)}, findings:<task>[@seed] (one grid cell, seed 0 unless @seed; findings:all = one "
        "per task of experiments/findings.toml), heads-stages (the head finder's peak per stage); all = load, every "
        "command and findings:all",
    )
    ap.add_argument("--heads", default=None, help="label heads for `prior` (default: PRIOR_HEADS of the model)")
    ap.add_argument("--rows", type=Path, default=None, help="append result rows (JSON lines) for benchmarks/table.py")
    args = ap.parse_args()
    mechicl = str(Path(sys.executable).with_name("mechicl"))
    print(f"peak RSS per command, {args.model}, default sizes, --threads 1, one subprocess each (os.wait4 ru_maxrss)")
    print("| command | wall s | peak RSS MB | RSS after load MB | peak - load MB |")
    print("|---|---|---|---|---|")
    load_rss = None
    names = []
    asked = args.commands.split(",")
    for name in [x for n in asked for x in (["load", *COMMANDS, "findings:all"] if n == "all" else [n])]:
        if name == "findings:all":
            names += [f"findings:{t}" for t in tomllib.loads((ROOT / "experiments/findings.toml").read_text())["tasks"]]
        else:
            names.append(name)
    known = {"load", "heads-stages", *COMMANDS}
    bad = [n for n in names if n not in known and not n.startswith("findings:")]
    bad += [n for n in names if n.startswith("findings:") and not (n.partition("@")[2] or "0").isdigit()]
    if bad:  # before any run: a typo must not end a long run halfway
        raise SystemExit(
            f"unknown command {bad}; use all, load, {', '.join(COMMANDS)}, findings:<task>[@seed] or heads-stages"
        )
    if "prior" in names and not (args.heads or args.model in PRIOR_HEADS):
        raise SystemExit(f"`prior` needs label heads for {args.model}: pass --heads 'L11H2;L15H0'")
    for name in names:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                if name == "load":
                    wall, peak, out = run_child([sys.executable, "-c", LOAD, args.model])
                    rss_kb, hwm_kb = (int(x) for x in out.split("RSS_KB")[1].split())
                    load_rss = rss_kb * 1024 / 1e6
                    cmd = f"python -c <load_model({args.model!r})>"
                elif name == "heads-stages":  # where `heads` peaks: the finder in one process, peak RSS per stage
                    wall, _, out = run_child([sys.executable, "-c", STAGES, args.model])
                    peak = 0.0  # the child's ru_maxrss only covers the last stage: resetting VmHWM resets it too
                    for line in out.splitlines():
                        if line.startswith("STAGE"):
                            stage, _, mb = line[len("STAGE ") :].rpartition(" ")
                            peak = max(peak, float(mb)) if stage != "model loaded (RSS now)" else peak
                            print(f"| &nbsp;&nbsp;{stage} | | {float(mb):.0f} | | |")
                            add_row(
                                args.rows,
                                bench="memory-stage",
                                model=args.model,
                                size=stage,
                                ours="heads stage",
                                ours_times=[wall],
                                ours_peak_mb=float(mb),
                            )
                    cmd = "find_heads_for(preset_config()) in one process (= mechicl heads defaults): the largest stage peak"
                elif name in COMMANDS:
                    argv = [mechicl, name, "--model", args.model, "--threads", "1", "--out", str(Path(tmp) / "run")]
                    heads = args.heads or PRIOR_HEADS.get(args.model) if name == "prior" else None
                    wall, peak, _ = run_child(argv + (["--heads", heads] if heads else []))
                    cmd = f"mechicl {name} --model {args.model} --threads 1 --out <tmp>"
                    cmd += f" --heads '{heads}'" if heads else ""
                elif name.startswith("findings:"):  # one grid cell of a task (seed 0, or @seed), grid settings
                    task, _, seed = name.split(":", 1)[1].partition("@")
                    seed = seed or "0"
                    grid = ["--config", "experiments/findings.toml", "--models", args.model, "--tasks", task]
                    grid += ["--seeds", seed]
                    wall, peak, _ = run_child(
                        [mechicl, "findings", *grid, "--threads", "1", "--out", str(Path(tmp) / "g")]
                    )
                    cell = json.loads(next((Path(tmp) / "g" / "cells").glob("*/cell.json")).read_text())
                    stages = ", ".join(f"{k} {v:.0f} s" for k, v in cell["timings"].items())
                    cmd = f"mechicl findings --config experiments/findings.toml --models {args.model} --tasks {task} --seeds {seed} --threads 1 --out <tmp> ({stages})"
        except RuntimeError as e:  # one failing command is reported, the others still run
            print(f"| `{name}` | failed: {str(e).splitlines()[0]} | | | |", flush=True)
            continue
        extra = f"{peak - load_rss:.0f}" if load_rss is not None else "n/a (add load to --commands)"
        print(
            f"| `{cmd}` | {wall:.0f} | {peak:.0f} | {'' if load_rss is None else f'{load_rss:.0f}'} | {extra} |",
            flush=True,
        )
        add_row(
            args.rows,
            bench="memory",
            model=args.model,
            size=name,
            ours=cmd,
            ours_times=[wall],
            ours_peak_mb=peak,
            model_rss_mb=load_rss,
        )


if __name__ == "__main__":
    main()
