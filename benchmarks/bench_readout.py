"""One-forward readout vs prompting once per k (issue 3's speed target: >= 10x at K = 32).

Both sides use the same readout (stop at the final norm, unembed only the label
tokens at the scored slot), run one context at a time, 1 thread, and exclude
tokenization. Prints medians over repeats, the ratio, and the largest
difference between the two sets of label logits.

    python benchmarks/bench_readout.py [--model gemma3-270m] [--k 32] [--contexts 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mechicl.models.loading import load_model
from mechicl.models.registry import DEFAULT_MODEL
from mechicl.data.prompts import build_prompt_batch, sample_contexts
from mechicl.analysis.hooks import run_to_final
from mechicl.analysis.readout import unembed_labels
from mechicl.data.tasks import load_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--task", default="vader-words")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--contexts", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded, task = load_model(args.model), load_task(args.task)
    ids = sample_contexts(task, args.contexts, args.k, seed=0)
    full = build_prompt_batch(task, loaded.tokenizer, ids, "default", n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    per_k = [
        build_prompt_batch(task, loaded.tokenizer, ids[:, : k + 1], "default", n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
        for k in range(args.k)
    ]
    m, lab = loaded.model, full.label_token_ids

    @torch.no_grad()
    def one_forward() -> torch.Tensor:
        out = []
        for i in range(args.contexts):
            n = int(full.lengths[i])
            resid = run_to_final(m, full.tokens[i : i + 1, :n])[0]
            out.append(unembed_labels(m, resid[full.readout_pos[i]], lab))
        return torch.stack(out)

    @torch.no_grad()
    def once_per_k() -> torch.Tensor:
        out = torch.zeros(args.contexts, args.k, len(lab))
        for k, b in enumerate(per_k):
            for i in range(args.contexts):
                n = int(b.lengths[i])
                resid = run_to_final(m, b.tokens[i : i + 1, :n])[0]
                out[i, k] = unembed_labels(m, resid[b.readout_pos[i, -1]], lab)
        return out

    t_one, t_per = [], []
    for _ in range(args.repeats):
        t = time.perf_counter(); a = one_forward(); t_one.append(time.perf_counter() - t)  # noqa: E702
        t = time.perf_counter(); b = once_per_k(); t_per.append(time.perf_counter() - t)  # noqa: E702
    med_one, med_per = statistics.median(t_one), statistics.median(t_per)
    print(f"model {loaded.name}, task {task.name}, K = {args.k}, {args.contexts} contexts "
          f"({int(full.lengths.float().mean())} tokens on average), 1 thread, {args.repeats} repeats")
    print(f"one forward per context : median {med_one:.2f} s")
    print(f"one prompt per k        : median {med_per:.2f} s")
    print(f"speed-up                : {med_per / med_one:.1f}x (target >= 10x)")
    print(f"max |logit difference|  : {(a - b).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
