"""Peak RSS and time of attention saliency at 4, 2 and 1 contexts per forward + backward, beside each other.

    python benchmarks/bench_saliency_memory.py [--model smollm2-135m] [--contexts 8]

One process, one thread: the model loads once, then ``analysis.inside.saliency.attention_saliency`` runs on the
same ``--contexts`` vader-words contexts (``mechicl attention``'s defaults: 16 examples) at each batch size, its
peak RSS window reset before each (``_common.timed``). Why `attention` runs saliency one context at a time
(issue 31): the backward keeps every layer's attention tensors for the whole sub-batch. The summed S_pq is printed
so the runs can be seen to compute the same thing.
"""

from __future__ import annotations

import argparse

import torch
from _common import rss_mb, timed

from mechicl.analysis.inside.saliency import attention_saliency
from mechicl.data.tasks import load_task
from mechicl.models.loading import load_model
from mechicl.runs.inside_batches import InsideConfig, default_and_flipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    batch = default_and_flipped(loaded, load_task("vader-words"), InsideConfig(args.model))[0]
    batch = batch.select(slice(0, args.contexts))
    base = rss_mb()
    print(f"{args.model}, {args.contexts} contexts of width {batch.tokens.shape[1]}; RSS after load {base:.0f} MB")
    print("| contexts per backward | seconds | peak RSS MB | peak - load MB | sum S_pq |")
    print("|---|---|---|---|---|")
    for size in (4, 2, 1):
        sec, peak, sal = timed(lambda: attention_saliency(loaded.model, [batch], "last", 4, size, progress=False))
        print(f"| {size} | {sec:.1f} | {peak:.0f} | {peak - base:.0f} | {float(sal.layers.S_pq.sum()):.6f} |")


if __name__ == "__main__":
    main()
