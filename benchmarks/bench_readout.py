"""P3: one-forward readout vs prompting once per k, at several K (issue 14: K = 32 and K = 64).

Both sides use the same readout (stop at the final norm, unembed only the label
tokens at the scored slot), run one context at a time, 1 thread, and exclude
tokenization. For each K: medians over interleaved repeats, the ratio, the largest
difference between the two sets of label logits, and each side's peak RSS
(``_common.timed``; the loaded model is in it). One row per K.

    python benchmarks/bench_readout.py [--model gemma3-270m] [--k 32,64] [--contexts 2] [--repeats 3] [--rows FILE]

Cost of the per-k side: K forwards of growing prompts per context (sum of lengths ~ K^2 / 2
examples), so K = 64 takes ~4x as long as K = 32; the one-forward side is one forward per context.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import add_row, median, rss_mb, timed

from mechicl.analysis.engine.hooks import run_to_final
from mechicl.analysis.engine.readout import unembed_labels
from mechicl.data.prompts import build_prompt_batch, sample_contexts
from mechicl.data.tasks import load_task
from mechicl.models.loading import load_model
from mechicl.models.registry import DEFAULT_MODEL


def measure_k(loaded, task, K: int, args) -> None:
    """One K: interleaved repeats of both sides; prints a row."""
    ids = sample_contexts(task, args.contexts, K, seed=0)
    kw = dict(n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    full = build_prompt_batch(task, loaded.tokenizer, ids, "default", **kw)
    per_k = [build_prompt_batch(task, loaded.tokenizer, ids[:, : k + 1], "default", **kw) for k in range(K)]
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
        out = torch.zeros(args.contexts, K, len(lab))
        for k, b in enumerate(per_k):
            for i in range(args.contexts):
                n = int(b.lengths[i])
                resid = run_to_final(m, b.tokens[i : i + 1, :n])[0]
                out[i, k] = unembed_labels(m, resid[b.readout_pos[i, -1]], lab)
        return out

    one_forward()  # warm up
    t_one, t_per, m_one, m_per = [], [], [], []
    for _ in range(args.repeats):
        dt, mb, a = timed(one_forward)
        t_one.append(dt), m_one.append(mb)
        dt, mb, b = timed(once_per_k)
        t_per.append(dt), m_per.append(mb)
    ratio = median(t_per) / median(t_one)
    diff = float((a - b).abs().max())
    tokens = int(full.lengths.float().mean())
    print(
        f"| {K} | {args.contexts} x {tokens} | {median(t_one):.2f} | {median(t_per):.2f} | **{ratio:.1f}x** "
        f"| {median([p / o for p, o in zip(t_per, t_one)]):.1f}x | {diff:.1e} | {max(m_one):.0f} | {max(m_per):.0f} |",
        flush=True,
    )
    add_row(
        args.rows,
        bench="P3",
        model=loaded.name,
        size=f"{args.contexts} ctx x K={K} ({tokens} tok)",
        ours="one forward per context",
        reference="one prompt per k (mechicl readout)",
        ours_times=t_one,
        ref_times=t_per,
        max_diff=diff,
        ours_peak_mb=max(m_one),
        ref_peak_mb=max(m_per),
        model_rss_mb=args.rss_model,
        goal="ratio >= 10 at K = 32 (issue 3), exact",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--task", default="vader-words")
    ap.add_argument("--k", default="32,64", help="comma list of K (examples per context; default 32,64)")
    ap.add_argument("--contexts", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=Path, default=None, help="append result rows (JSON lines) for benchmarks/table.py")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    loaded, task = load_model(args.model), load_task(args.task)
    args.rss_model = rss_mb()
    print(
        f"P3 one-forward readout vs once per k, {loaded.name}, task {task.name}, 1 thread, "
        f"median of {args.repeats} interleaved repeats; RSS after load {args.rss_model:.0f} MB"
    )
    print(
        "| K | contexts x tokens (mean) | one forward s | once per k s | ratio | per-repeat ratio "
        "| max diff label logits | one-forward peak MB | per-k peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for K in (int(x) for x in args.k.split(",")):
        measure_k(loaded, task, K, args)
    print(f"\ntotal benchmark wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
