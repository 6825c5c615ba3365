"""The findings grid serially and on local workers, side by side in one run: wall time, the ratio, peak RSS, and
whether every cell's tables are byte-identical.

    flock /tmp/mechicl-cpu.lock .venv/bin/python benchmarks/bench_grid.py --models gemma3-270m --workers 2 \
        --rows benchmarks/results/rows.jsonl

Each arm is one ``mechicl findings --config experiments/findings.toml --threads 1`` child process on a fresh
grid folder (a temporary one, removed afterwards unless ``--keep``): ``--workers 1`` runs every cell in that
process, ``--workers N`` in a pool of N processes (one torch thread each, a fresh process per cell). Wall time
is the child's; peak RSS is ``os.wait4``'s ``ru_maxrss`` (the largest single process of the arm: the serial
process, or the largest worker). Then, per cell: the stage times and the peak RSS that ``cell.json`` recorded
(the worker pool's, where each cell had its own process), and a byte comparison of every CSV of every cell.
Run the serial arm first, nothing else running: the pool needs both cores.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import tempfile
from pathlib import Path

from _common import MACHINE, add_row
from bench_memory import run_child

TABLES = ("screen", "confirm", "validate", "sets", "controls")


def run_arm(args: argparse.Namespace, workers: int, out: Path) -> tuple[float, float]:
    """``(wall s, peak RSS MB)`` of one ``mechicl findings`` child over the grid."""
    mechicl = str(Path(sys.executable).with_name("mechicl"))
    cmd = [mechicl, "findings", "--config", args.config, "--threads", "1", "--workers", str(workers)]
    for flag in ("models", "tasks", "seeds"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    wall, peak, _ = run_child([*cmd, "--out", str(out)])
    return wall, peak


def compare(a: Path, b: Path) -> tuple[int, list[str]]:
    """How many CSVs were compared, and those that differ in any byte (or exist in one arm only)."""
    slugs = sorted({p.name for p in (a / "cells").iterdir()} | {p.name for p in (b / "cells").iterdir()})
    names = [f"cells/{s}/{t}.csv" for s in slugs for t in TABLES]
    differ = [n for n in names if (a / n).exists() != (b / n).exists()]
    differ += [n for n in names if (a / n).exists() and (b / n).exists() and not filecmp.cmp(a / n, b / n, False)]
    return len(names), differ


def cell_rows(out: Path) -> list[dict]:
    """Per cell: its slug, verdict, stage seconds and recorded peak RSS (``cell.json``)."""
    rows = []
    for p in sorted((out / "cells").glob("*/cell.json")):
        c = json.loads(p.read_text())
        rows.append({"cell": p.parent.name, "effect": c["has_effect"], **c["timings"], "peak_gb": c["peak_rss_gb"]})
    return rows


def print_cells(out: Path, csv: Path | None) -> None:
    """The per-cell table (stage seconds, peak RSS of the cell's own process), printed and written to ``csv``."""
    print("| cell | effect | baseline s | screen s | confirm s | validate s | total s | peak RSS GB (own process) |")
    print("|---|---|---|---|---|---|---|---|")
    lines = ["cell,effect,baseline_s,screen_s,confirm_s,validate_s,total_s,peak_rss_gb"]
    for r in cell_rows(out):
        stages = [r.get(k, 0.0) for k in ("baseline", "screen", "confirm", "validate")]
        cells = " | ".join(f"{x:.0f}" for x in stages)
        print(f"| {r['cell']} | {r['effect']} | {cells} | {sum(stages):.0f} | {r['peak_gb']:.2f} |")
        nums = [f"{x:.1f}" for x in (*stages, sum(stages))]
        lines.append(",".join([r["cell"], str(r["effect"]), *nums, f"{r['peak_gb']:.3f}"]))
    if csv:
        csv.parent.mkdir(parents=True, exist_ok=True)
        csv.write_text("\n".join(lines) + "\n")
    print_tasks(cell_rows(out))


def print_tasks(rows: list[dict]) -> None:
    """Per task: how many cells, the range of their stage times and totals, and of their peak RSS."""
    print()
    print("| task | cells (with an effect) | baseline s | screen s | confirm s | validate s | total s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    tasks: dict[str, list[dict]] = {}
    for r in rows:
        tasks.setdefault(r["cell"].split("__")[1], []).append(r)
    span = lambda xs, f: f(min(xs)) if f(min(xs)) == f(max(xs)) else f"{f(min(xs))}–{f(max(xs))}"  # noqa: E731
    for task, rs in tasks.items():
        cols = [[r.get(k, 0.0) for r in rs] for k in ("baseline", "screen", "confirm", "validate")]
        total = [sum(x) for x in zip(*cols)]
        secs = " | ".join(span(c, lambda x: f"{x:.0f}") for c in (*cols, total))
        peak = span([r["peak_gb"] for r in rs], lambda x: f"{x:.2f}")
        print(f"| {task} | {len(rs)} ({sum(r['effect'] for r in rs)}) | {secs} | {peak} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="experiments/findings.toml")
    ap.add_argument("--models", default="gemma3-270m")
    ap.add_argument("--tasks", default=None, help="comma list (default: the config's)")
    ap.add_argument("--seeds", default=None, help="comma list (default: the config's)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="keep both grid folders under this folder")
    ap.add_argument("--rows", type=Path, default=None, help="append result rows (JSON lines) for benchmarks/table.py")
    ap.add_argument("--cells", type=Path, default=None, help="write the per-cell table (CSV) of the workers' arm here")
    ap.add_argument("--cells-from", type=Path, default=None, help="only print (and --cells: write) a kept arm's cells")
    args = ap.parse_args()
    if args.cells_from:
        print_cells(args.cells_from, args.cells)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-grid-"))
    try:
        serial, pool = tmp / "serial", tmp / f"workers{args.workers}"
        s_wall, s_peak = run_arm(args, 1, serial)
        print(f"serial (--workers 1): {s_wall:.0f} s, peak RSS {s_peak:.0f} MB", flush=True)
        p_wall, p_peak = run_arm(args, args.workers, pool)
        print(f"--workers {args.workers}: {p_wall:.0f} s, peak RSS of the largest worker {p_peak:.0f} MB", flush=True)
        n, differ = compare(serial, pool)
        ratio = p_wall / s_wall
        print(f"machine: {MACHINE}")
        print(
            f"ratio (workers {args.workers} / serial): {ratio:.2f}; {n - len(differ)} of {n} cell CSVs byte-identical"
        )
        for d in differ:
            print(f"  differs: {d}")
        print_cells(pool, args.cells)
        add_row(
            args.rows,
            bench="grid",
            model=args.models,
            size=f"{len(cell_rows(pool))} cells, --workers {args.workers} vs 1",
            ours=f"mechicl findings --workers {args.workers}",
            reference="mechicl findings --workers 1",
            ours_times=[p_wall],
            ref_times=[s_wall],
            ours_peak_mb=p_peak,
            ref_peak_mb=s_peak,
            identical=not differ,
        )
        if args.keep:
            shutil.copytree(tmp, args.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
