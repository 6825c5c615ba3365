"""Memory of the sweeps the commands run, against the goal "model + 2x the activations a sweep needs".

    python benchmarks/bench_sweep_memory.py [--model gemma3-270m] [--repeats 3] [--rows FILE]

The yardstick ``A`` ("the activations a sweep needs") is measured, not modelled: the bytes of every
TransformerLens hook activation of one forward of the sweep's batch (``run_with_cache`` without a filter
on the receiver run's tokens up to the query slot; attention patterns and scores included), the full
cache a naive implementation would hold. Each sweep then runs in this process after ``malloc_trim``
with the peak RSS window reset (``_common.timed``); ``extra`` is its peak minus the RSS just before it
(the loaded model and the Python heap). The goal is ``extra <= 2 A``.

Sweeps, at the sizes the commands use by default (``mechicl patch``: 4 contexts x 8 examples;
``mechicl heads``: 16 screening contexts x 17 examples):

* ``Patcher.sweep('head_out')`` and ``Patcher.sweep('resid')`` (denoise), a fresh Patcher each;
* ``Patcher.sweep('head_out_readout')`` on the heads pair (two ReadoutSteppers);
* ``attribution_patch(('head_out', 'head_out_readout'))`` on the heads pair with ``max_rows`` = 16 (one chunk:
  the whole batch's autograd graph, as before chunking) and 4 (the default), repeats interleaved, medians of
  time; peak is the largest over repeats. The two must agree (max |difference| printed).

One thread. Prints one markdown table; ``--rows`` appends rows for ``benchmarks/table.py``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from _common import add_row, median, reset_peak, rss_mb, timed

warnings.filterwarnings("ignore")
SHORT = {
    "head_out": "Patcher.sweep('head_out')",
    "resid": "Patcher.sweep('resid')",
    "head_out_readout": "Patcher.sweep('head_out_readout')",
    "attr16": "attribution_patch, max_rows=16 (one chunk)",
    "attr4": "attribution_patch, max_rows=4 (default)",
}


def activation_bytes(model, tokens: torch.Tensor) -> int:
    """Bytes of every hook activation of one forward of ``tokens`` up to the final norm (the yardstick A).

    The unembedding's hooks are left out (no sweep computes full-vocabulary logits), and a tensor cached
    under two hook names (the bridge's aliases) counts once."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: not name.startswith("unembed"))
    seen = {(v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)): v for v in cache.values()}
    n = sum(int(v.numel()) * v.element_size() for v in seen.values())
    del cache, seen
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--task", default="vader-words")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--sweeps",
        default=",".join(SHORT),
        help=f"comma list of {', '.join(SHORT)} (default all; resid takes ~4 min a repeat on gemma3-270m)",
    )
    ap.add_argument("--rows", type=Path, default=None, help="append result rows (JSON lines) for benchmarks/table.py")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from mechicl.analysis.patching.attribution import attribution_patch
    from mechicl.analysis.patching.exact import Patcher
    from mechicl.data.pairs import pair_for
    from mechicl.data.tasks import load_task
    from mechicl.models.loading import load_model

    loaded, task = load_model(args.model), load_task(args.task)
    model = loaded.model
    reset_peak()
    rss_model = rss_mb()
    patch_pair = pair_for(loaded, task, 4, 8, seed=args.seed)
    heads_pair = pair_for(loaded, task, 16, 17, seed=args.seed)
    kinds = ("head_out", "head_out_readout")
    sweeps = {
        "Patcher.sweep('head_out')": (patch_pair, lambda: Patcher(model, patch_pair).sweep("head_out").values),
        "Patcher.sweep('resid')": (patch_pair, lambda: Patcher(model, patch_pair).sweep("resid").values),
        "Patcher.sweep('head_out_readout')": (
            heads_pair,
            lambda: Patcher(model, heads_pair).sweep("head_out_readout").values,
        ),
        "attribution_patch, max_rows=16 (one chunk)": (
            heads_pair,
            lambda: attribution_patch(model, heads_pair, kinds, max_rows=16)["head_out"].values,
        ),
        "attribution_patch, max_rows=4 (default)": (
            heads_pair,
            lambda: attribution_patch(model, heads_pair, kinds, max_rows=4)["head_out"].values,
        ),
    }
    chosen = [x.strip() for x in args.sweeps.split(",") if x.strip()]
    bad = [x for x in chosen if x not in SHORT]
    if bad:
        raise SystemExit(f"unknown sweep(s) {bad}; use a comma list of {', '.join(SHORT)}")
    sweeps = {SHORT[x]: sweeps[SHORT[x]] for x in chosen}
    print(
        f"Sweep memory, {loaded.name}, task {task.name}, 1 thread; RSS after load {rss_model:.0f} MB; "
        f"time: median of {args.repeats} interleaved repeats, peak: the largest"
    )
    print(
        "| sweep | contexts x tokens | A = all activations of one forward (MB) | s | peak RSS MB | extra MB "
        "| extra / A | goal extra <= 2A |"
    )
    print("|---|---|---|---|---|---|---|---|")
    times: dict[str, list[float]] = {k: [] for k in sweeps}
    peaks: dict[str, list[float]] = {k: [] for k in sweeps}
    values: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, (_pair, fn) in sweeps.items():
            before = (reset_peak(), rss_mb())[1]
            dt, peak, values[name] = timed(fn)
            times[name].append(dt), peaks[name].append(peak - before)
    for name, (pair, _) in sweeps.items():
        W = int(pair.query_pos.max()) + 1
        a_mb = activation_bytes(model, pair.corrupted.tokens[:, :W]) / 1e6
        extra = max(peaks[name])
        size = f"{pair.n_contexts} x {W}"
        ok = "PASS" if extra <= 2 * a_mb else "MISS"
        print(
            f"| {name} | {size} | {a_mb:.0f} | {median(times[name]):.2f} | {rss_model + extra:.0f} | {extra:.0f} "
            f"| {extra / a_mb:.2f} | {ok} |",
            flush=True,
        )
        add_row(
            args.rows,
            bench="memory-sweep",
            model=loaded.name,
            size=f"{name}, {size} tok",
            ours=name,
            reference=f"2 x A = {2 * a_mb:.0f} MB",
            ours_times=times[name],
            ref_times=[],
            max_diff=None,
            ours_peak_mb=rss_model + extra,
            ref_peak_mb=None,
            model_rss_mb=rss_model,
            activations_mb=a_mb,
            extra_mb=extra,
            goal="extra <= 2 x activations of one forward",
        )
    if SHORT["attr16"] in values and SHORT["attr4"] in values:
        diff = float((values[SHORT["attr16"]] - values[SHORT["attr4"]]).abs().max())
        print(f"attribution_patch max |difference| between 16 and 4 rows per chunk: {diff:.1e}")


if __name__ == "__main__":
    main()
