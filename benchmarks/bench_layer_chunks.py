"""Every head ablated alone, in chunks cut in the order given against chunks grouped by layer, side by side.

    python benchmarks/bench_layer_chunks.py [--model gemma3-270m] [--task vader-words] [--repeats 3]

Why (issue 31): the screens of the head finder and of the prior-head finder list every head layer by layer, and
the steppers re-run a chunk of interventions from the lowest layer any of them touches. Cut in slices of the order
given, a slice holding heads of layers 0-12 re-ran 13 layers for each; ``analysis.engine.reruns.layer_chunks``
sorts them by layer and cuts where the blocks re-run are fewest. Two workloads, each as the report sizes it
(``ReportConfig``: 8 screening contexts of 9 examples, slots k >= 4) or as a findings cell does (``--k 16 --k-min
8``): the finder's screen (``HeadAblation.scores`` of every head, one resample draw, both conditions) and the
prior-head screen (``zero_shot_support`` of every head on the validation queries alone, 2 draws). The baseline is the
old cut, written here: consecutive slices of ``per`` interventions (each slice re-runs from its own lowest layer; the
readout stepper re-ran every slice from layer 0 before, which for the prior-head screen, one slice of 72 heads, is
the same work). One process, one thread, the steppers built once;
each arm timed ``--repeats`` times alternately, medians; the largest difference between the arms' results printed.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import median

from mechicl.analysis.engine import reruns
from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.analysis.heads.ablation import HeadAblation
from mechicl.analysis.prior.prior_heads import zero_shot_support
from mechicl.data.batches import held_out_batches, stage_draws
from mechicl.data.tasks import load_task
from mechicl.models.loading import load_model
from mechicl.models.machine import machine_line

GROUPED = reruns.layer_chunks


def in_order(masks: torch.Tensor, per: int, rows: int = 1, call_rows: int = 0) -> list[torch.Tensor]:
    """The cut before ``layer_chunks``: consecutive slices of ``per`` interventions, in the order given."""
    n = masks.shape[0]
    return [torch.arange(i, min(n, i + per)) for i in range(0, n, per)]


def arms(work, repeats: int) -> tuple[list[float], list[float], float]:
    """Alternating timed runs of ``work()`` under each cut; returns (in-order s, grouped s, max |difference|)."""
    times: dict[str, list[float]] = {"in order": [], "grouped": []}
    out = {}
    for _ in range(repeats):
        for name, cut in (("in order", in_order), ("grouped", GROUPED)):
            reruns.layer_chunks = cut
            t = time.perf_counter()
            out[name] = work()
            times[name].append(time.perf_counter() - t)
    reruns.layer_chunks = GROUPED
    diff = float(torch.as_tensor(out["in order"] - out["grouped"]).abs().max())
    return times["in order"], times["grouped"], diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--task", default="vader-words")
    ap.add_argument("--contexts", type=int, default=8)
    ap.add_argument("--k", type=int, default=8, help="demonstrations before the query (report: 8, findings: 16)")
    ap.add_argument("--k-min", type=int, default=4)
    ap.add_argument("--queries", type=int, default=32, help="zero-shot queries of the prior-head screen")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    task = load_task(args.task)
    sizes = {"screen": args.contexts, "confirm": 4, "validate": args.queries}
    draws = stage_draws(task, sizes, args.k + 1, seed=0)
    hb = held_out_batches(task, loaded.tokenizer, draws, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    L, H = int(loaded.model.cfg.n_layers), int(loaded.model.cfg.n_heads)
    heads = [[(l, h)] for l in range(L) for h in range(H)]
    abl = HeadAblation(loaded.model, *hb.stages["screen"], args.k_min, mode="interchange", n_resample=1)
    zs = ReadoutStepper(loaded.model, hb.zero_shot)
    work = {
        f"finder screen: {L * H} heads, {args.contexts} contexts x slots {args.k_min}..{args.k}, both conditions": (
            lambda: torch.tensor(abl.scores(heads).closed)
        ),
        f"prior-head screen: {L * H} heads, {hb.zero_shot.n_contexts} zero-shot queries, 2 draws": (
            lambda: torch.tensor(zero_shot_support(zs, heads, n_resample=2))
        ),
    }
    print(f"{args.model} on {args.task}, {args.repeats} alternating repeats, one thread; medians")
    print("| workload | in order s | grouped by layer s | in order / grouped | max abs difference |")
    print("|---|---|---|---|---|")
    for name, fn in work.items():
        a, b, diff = arms(fn, args.repeats)
        print(f"| {name} | {median(a):.2f} | {median(b):.2f} | {median(a) / median(b):.2f}x | {diff:.1e} |", flush=True)
    print(f"[bench] after the runs: {machine_line()}")


if __name__ == "__main__":
    main()
