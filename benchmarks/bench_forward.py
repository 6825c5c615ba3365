"""Time one forward of a ~300-token prompt per model, full logits vs body only (1 thread, medians).

python benchmarks/bench_forward.py [--models gemma3-270m,smollm2-135m] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import MACHINE  # noqa: F401 - importing it prints the machine line (CPU, one-thread matmul GFLOPS)

from mechicl.analysis.engine.hooks import run_to_final
from mechicl.data.prompts import build_prompt_batch, sample_contexts
from mechicl.data.tasks import load_task
from mechicl.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gemma3-270m,smollm2-135m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = load_task("vader-movies")
    for name in args.models.split(","):
        loaded = load_model(name)
        ids = sample_contexts(task, 1, 40, seed=0)
        b = build_prompt_batch(task, loaded.tokenizer, ids, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
        tokens = b.tokens[:, : args.tokens]
        assert tokens.shape[1] == args.tokens, "prompt shorter than requested; raise the number of examples"
        with torch.no_grad():
            loaded.model(tokens)  # warm-up
            full, body = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                loaded.model(tokens)
                full.append(time.perf_counter() - t)  # noqa: E702
                t = time.perf_counter()
                run_to_final(loaded.model, tokens)
                body.append(time.perf_counter() - t)  # noqa: E702
        f, bo = statistics.median(full), statistics.median(body)
        print(
            f"{name}: {args.tokens} tokens, full forward {f:.2f} s, body only {bo:.2f} s "
            f"(unembedding = {100 * (1 - bo / f):.0f}% of the forward), median of {args.repeats}, 1 thread"
        )


if __name__ == "__main__":
    main()
