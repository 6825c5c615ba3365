"""Where `mechicl report`'s time goes: the floating-point work of every linear layer, stage by stage, and the rate
it ran at.

    python benchmarks/bench_report_flops.py [--model gemma3-270m] [--out DIR] [--at 40]

One process, one thread: `mechicl report` at its defaults, with every ``torch.nn.Linear`` call counted (2 x rows x
in x out floating-point operations) and timed, attributed to the report stage running (``runs.report.Stages``) and
binned by the rows of the call (one-token steps come in large batches of appended tokens; a build runs whole
contexts). Linear layers are the projections and MLPs of every block (the unembedding is applied separately, to
the label tokens only, and is not counted, nor are attention scores, norms or backwards), so ``--at`` GFLOPS
gives a lower bound on each stage's time on a slower core: its linear work alone at that rate, if every product
ran at the core's full matmul speed. Why (issue 31): whether the main job can meet a 5-minute budget on a
40-GFLOPS core is a question of how much work it does, not of overheads, when the work already runs near the
machine's matmul rate.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import tempfile
import time
from collections.abc import Iterator

import torch
from _common import MACHINE

import mechicl.runs.report as report_run
from mechicl.cli import main as mechicl_main
from mechicl.models.machine import machine_line

BINS = (64, 512, 4096)  # rows per call: <= 64, <= 512, <= 4096, more


def instrument() -> dict[tuple[str, str], list[float]]:
    """Count and time every Linear call under the report stage running; returns the live tally."""
    tally: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    stage = ["start-up"]
    forward = torch.nn.Linear.forward

    def counted(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        y = forward(self, x)
        rows = x.numel() // x.shape[-1]
        b = next((f"<= {m}" for m in BINS if rows <= m), f"> {BINS[-1]}")
        row = tally[(stage[0], b)]
        row[0] += 1
        row[1] += 2.0 * rows * self.in_features * self.out_features
        row[2] += time.perf_counter() - t
        return y

    timed_stage = report_run.Stages.stage

    @contextlib.contextmanager
    def named(self: report_run.Stages, name: str, contexts: str) -> Iterator[None]:
        stage[0] = name
        with timed_stage(self, name, contexts):
            yield
        stage[0] = "between stages"

    torch.nn.Linear.forward = counted
    report_run.Stages.stage = named
    return tally


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--out", default=None, help="the report's run folder (default: a temporary one)")
    ap.add_argument("--at", type=float, default=40.0, help="GFLOPS of the slower core the lower bound is for")
    args = ap.parse_args()
    tally = instrument()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or f"{tmp}/run"
        t = time.perf_counter()
        if mechicl_main(["report", "--model", args.model, "--threads", "1", "--out", out]):
            raise SystemExit("mechicl report failed (its error is above)")
        wall = time.perf_counter() - t
    print(f"machine before: {MACHINE}; after: {machine_line()}")
    print(f"`mechicl report --model {args.model} --threads 1`: {wall:.0f} s wall")
    print(f"| stage | rows per call | calls | linear GFLOP | linear s | GFLOPS achieved | s at {args.at:g} GFLOPS |")
    print("|---|---|---|---|---|---|---|")
    totals = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    for (stage, b), (calls, flop, sec) in tally.items():
        print(
            f"| {stage} | {b} | {calls:.0f} | {flop / 1e9:.0f} | {sec:.1f} | {flop / 1e9 / sec:.0f} "
            f"| {flop / 1e9 / args.at:.0f} |"
        )
        for i, v in enumerate((calls, flop, sec)):
            totals[stage][i] += v
    print(f"\n| stage | linear GFLOP | linear s | GFLOPS achieved | lower bound s at {args.at:g} GFLOPS |")
    print("|---|---|---|---|---|")
    for stage, (_, flop, sec) in totals.items():
        print(f"| {stage} | {flop / 1e9:.0f} | {sec:.1f} | {flop / 1e9 / sec:.0f} | {flop / 1e9 / args.at:.0f} |")
    flop, sec = sum(v[1] for v in totals.values()), sum(v[2] for v in totals.values())
    print(f"| all | {flop / 1e9:.0f} | {sec:.1f} | {flop / 1e9 / sec:.0f} | {flop / 1e9 / args.at:.0f} |")


if __name__ == "__main__":
    main()
