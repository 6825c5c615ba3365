"""Where a findings cell's resident memory goes: RSS sampled every 50 ms, labelled by the step running.

    flock /tmp/mechicl-cpu.lock .venv/bin/python benchmarks/findings_memory.py --model gemma3-270m \
        --task vader-words --seeds 0,1 --out /tmp/findings-mem

Runs ``runs.findings.run_cell`` for each seed in one process (the grid's way: the model loads once)
with the grid config of ``experiments/findings.toml``, one torch thread. Prints, per seed, the wall
time, the peak RSS inside each labelled step, the RSS left after the cell and how much of it is
live tensors (everything else is freed heap the allocator kept). Numbers: ``docs/findings.md``, "Cost".
"""

from __future__ import annotations

import argparse
import functools
import gc
import threading
import time
from pathlib import Path

import psutil
import torch
from _common import MACHINE  # noqa: F401 - importing it prints the machine line (CPU, one-thread matmul GFLOPS)

from mechicl.analysis.engine import slots as SL
from mechicl.analysis.engine import stepper as ST
from mechicl.analysis.heads import ablation as AB
from mechicl.analysis.heads import finder as AF
from mechicl.models.loading import load_model
from mechicl.runs import findings as F

PROC = psutil.Process()
LABEL = ["start"]
PEAKS: dict[str, float] = {}


def rss() -> float:
    return PROC.memory_info().rss / 2**20


def sample(stop: threading.Event) -> None:
    while not stop.is_set():
        key = " > ".join(LABEL[1:]) or LABEL[0]  # the stack of steps: "validate > ablation build > stepper build"
        PEAKS[key] = max(PEAKS.get(key, 0.0), rss())
        time.sleep(0.05)


def label(obj: object, name: str, tag: str) -> None:
    f = getattr(obj, name)

    @functools.wraps(f)
    def wrapped(*a, **kw):
        LABEL.append(tag)
        try:
            return f(*a, **kw)
        finally:
            LABEL.pop()

    setattr(obj, name, wrapped)


def live_tensor_mb() -> float:
    seen: dict[int, int] = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and not isinstance(o, torch.nn.Parameter):
            s = o.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--task", default="vader-words")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--config", default="experiments/findings.toml")
    ap.add_argument("--out", type=Path, required=True, help="a scratch grid folder (cells are written there)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for obj, name, tag in [
        (SL.SlotStepper, "_init_kv", "stepper build"),
        (SL.SlotStepper, "run", "slot re-runs"),
        (SL.SlotStepper, "attribution", "attribution"),
        (ST.ReadoutStepper, "__init__", "zero-shot"),
        (AB.HeadAblation, "__init__", "ablation build"),
        (AF, "_screen", "screen"),
        (AF, "_confirm", "confirm"),
        (AF, "validate_top", "validate"),  # the finder's own reference (imported by name)
        (AF, "_baseline", "check"),
    ]:
        label(obj, name, tag)
    stop = threading.Event()
    threading.Thread(target=sample, args=(stop,), daemon=True).start()
    LABEL.append("load")
    t = time.perf_counter()
    loaded = load_model(args.model)
    LABEL.pop()
    print(f"load {time.perf_counter() - t:.1f} s; RSS after {rss():.0f} MB, peak during {PEAKS.get('load', 0):.0f} MB")
    spec = F.load_grid(args.config)
    for seed in [int(s) for s in args.seeds.split(",")]:
        PEAKS.clear()
        cell = F.Cell(args.model, args.task, seed)
        t = time.perf_counter()
        F.run_cell(loaded, cell, spec.cell_config(cell), args.out, progress=False)
        gc.collect()
        steps = ", ".join(f"{k} {v:.0f}" for k, v in sorted(PEAKS.items(), key=lambda x: -x[1]))
        print(
            f"seed {seed}: {time.perf_counter() - t:.1f} s; peak RSS by step (MB): {steps}; after the cell "
            f"{rss():.0f} MB, of which live non-parameter tensors {live_tensor_mb():.0f} MB"
        )
    stop.set()


if __name__ == "__main__":
    main()
