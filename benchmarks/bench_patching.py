"""P1: exact all-heads output patching against TransformerLens 4.3, side by side in one process, at several sizes.

    python benchmarks/bench_patching.py [--model gemma3-270m] [--contexts 4] [--examples 8,32] [--repeats 3]
        [--last-m M] [--no-extras] [--resid] [--rows FILE]

For each number of examples per context: an all-heads output patching sweep (``hook_z`` at
every position), correct -> flipped labels (denoising; every demonstration label flipped, or with
``--last-m M`` only the last ``M``), with

* mechicl: ``Patcher(model, pair).sweep("head_out")`` (fresh Patcher each repeat, so
  its two cached runs are included), and
* TransformerLens: ``run_with_cache`` of the clean run +
  ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos`` with the same
  normalised metric (its baselines come from full forwards, ``tests.helpers.tl_metric``,
  and are not timed: favours TL), and
* nnsight 0.8 (when installed, ``pip install -e '.[bench]'``; else the arm is skipped with a printed line):
  the loop of nnsight's activation-patching docs over ``NNsight`` of the plain Hugging Face model on the
  bridge's own weights (``nnsight_peer.py``): a clean trace saving every ``o_proj`` input (the heads' ``z``),
  a corrupted trace for the baseline, then one ``model.trace(corrupted)`` per head writing the head's clean
  slice at every position (its two baseline traces are timed).

All on the same prompts, 1 thread, repeats interleaved, medians reported (and the
median of the per-repeat ratios, robust to a noisy neighbour on a shared machine), with
each side's peak RSS (``_common.timed``; the loaded model is in it).

**FLOP lower bound** printed beside the achieved time: a patch at layer ``l`` must run the
``L - l`` downstream blocks and unembed the label logits at the query slot, nothing more,
so an all-heads sweep needs ``H * sum_l (L - l) / L = H (L + 1) / 2`` readout forwards of the
receiver batch (tokens up to the query slot; the two cached runs are not counted). The bound
in seconds is that count times the measured median of one readout forward
(``run_to_final`` on the same tokens). Goal: mechicl within 1.3x of it. Positions before the first
differing label are the same in every patched run, so where mechicl reuses their keys and values
(``analysis.engine.prefix_reuse``: HF models, contexts within any sliding window) the bound's forward is the
re-run of the remaining positions over the cached prefix (``SuffixRunner.run``, no hooks), timed the
same way; the full-width bound is printed below the row. With ``--last-m`` most of the prompt is such a prefix.

``--resid``: instead, the residual-stream sweep of ``mechicl report`` at its defaults (gemma3-270m, vader-words,
``ReportConfig``: 4 contexts x 9 examples, cells at every layer and every position of the last 2 examples,
denoising; a fresh Patcher each repeat, both cached runs included), before (``prefix_reuse=False``: every cell
re-runs the full width from its layer) and after (every cell re-runs positions ``p ..`` query slot over the
receiver's KV cache, ``prefix_reuse.suffix_groups`` choosing the calls), repeats interleaved, medians and the
median per-repeat ratio, the max difference between the two, and once each the two extreme groupings (one call per
cell; the fewest calls).

Then (unless ``--no-extras``), on the last size: attribution patching (2 forwards + 1
backward) in forward-equivalents with its Spearman / top-10 overlap against the exact sweep;
the readout-slot head sweep; and a check of the bridge's ``start_at_layer`` against mechicl's
block skipping.

The difference is float32 noise: mechicl unembeds two label columns, TL the whole
vocabulary, and the two GEMMs round differently (~1e-5 in the raw logit
difference). The normalised metric divides by (clean - corrupted), so a pair with a
small normaliser amplifies it (each side by its own baselines); the raw difference (mean LD of each
cell, TL's values un-normalised with its own baselines) is printed next to it.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from functools import partialmethod
from pathlib import Path

import torch
from _common import MACHINE, add_row, median, rss_mb, timed
from nnsight_peer import nnsight_head_sweep, nnsight_peer, nnsight_version

warnings.filterwarnings("ignore")


def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return median(times), out


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def measure_size(loaded, task, args, n_ex: int, rss_model: float, peer=None):
    """One size: interleaved repeats of mechicl, TL and (``peer``: ``nnsight_peer``, or None) nnsight, the readout
    forward for the bound; prints a row (and a line for nnsight)."""
    import transformer_lens.patching as tlp

    from mechicl.analysis.engine.hooks import run_to_final
    from mechicl.analysis.patching.exact import Patcher
    from mechicl.data.pairs import pair_for
    from tests.helpers import tl_metric

    model = loaded.model
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    pair = pair_for(loaded, task, args.contexts, n_ex, seed=args.seed, last_m=args.last_m)
    metric = tl_metric(loaded, pair)  # TL's metric, its baselines from full forwards
    width = int(pair.query_pos.max()) + 1
    ours = lambda: Patcher(model, pair).sweep("head_out", "denoise")  # noqa: E731

    def tl():
        with torch.no_grad():
            _, clean_cache = model.run_with_cache(pair.clean.tokens)
            return tlp.get_act_patch_attn_head_out_all_pos(model, pair.corrupted.tokens, clean_cache, metric)

    def readout_forward():
        with torch.no_grad():
            return run_to_final(model, pair.corrupted.tokens[:, :width])

    warm = Patcher(model, pair)
    warm.sweep("head_out", "denoise", cells=[(L - 1, 0)]), readout_forward()  # warm up (one cell)
    runner = warm.suffix_runner("corrupted")  # None: no prefix reuse on this model, the bound is full width
    p0 = runner.start if runner is not None else 0
    bound_forward = readout_forward if runner is None else (lambda: runner.run(pair.corrupted.tokens[:, p0:width]))
    with torch.no_grad():
        model(pair.corrupted.tokens)
    peer_sweep = None if peer is None else (lambda: nnsight_head_sweep(peer, pair))
    if peer is not None:
        nnsight_head_sweep(peer, pair, cells=[(L - 1, 0)])  # warm up (its two baselines and one cell)
    t_o, t_r, t_n, t_ro, t_full, m_o, m_r, m_n = [], [], [], [], [], [], [], []
    for _ in range(args.repeats):
        dt, mb, res = timed(ours)
        t_o.append(dt), m_o.append(mb)
        dt, mb, res_tl = timed(tl)
        t_r.append(dt), m_r.append(mb)
        if peer_sweep is not None:
            dt, mb, res_nn = timed(peer_sweep)
            t_n.append(dt), m_n.append(mb)
        t_ro.append(_median_time(bound_forward, 3)[0])
        t_full.append(_median_time(readout_forward, 3)[0])
    diff = float((res.values - res_tl).abs().max())
    rows = torch.arange(pair.n_contexts)

    def mean_ld(tokens):  # TL's baselines, taken as tests.helpers.tl_metric takes them (full forwards)
        with torch.no_grad():
            at = model(tokens)[rows, pair.query_pos]
        return float((at[rows, pair.answer_ids] - at[rows, pair.foil_ids]).mean())

    tl_clean, tl_corr = mean_ld(pair.clean.tokens), mean_ld(pair.corrupted.tokens)
    raw = float((res.logit_diff.mean(-1) - (res_tl * (tl_clean - tl_corr) + tl_corr)).abs().max())  # un-normalised
    ratio, per = median(t_r) / median(t_o), median([r / o for r, o in zip(t_r, t_o)])
    n_bound = H * (L + 1) / 2
    bound = n_bound * median(t_ro)
    tokens = int(pair.clean.tokens.shape[1])
    flips = "all flipped" if args.last_m is None else f"last {args.last_m} flipped"
    print(
        f"| {n_ex}, {flips} | {args.contexts} x {tokens}, re-run {p0}..{width - 1} | {median(t_o):.2f} | {median(t_r):.2f} | **{ratio:.2f}x** {verdict(ratio >= 10)} "
        f"| {per:.2f}x | {diff:.1e} {verdict(diff <= 1e-4)} | {raw:.1e} | {bound:.2f} ({n_bound:.0f} x {median(t_ro):.3f}) "
        f"| **{median(t_o) / bound:.2f}x** {verdict(median(t_o) <= 1.3 * bound)} | {res.forwards:.1f} | {max(m_o):.0f} | {max(m_r):.0f} |",
        flush=True,
    )
    print(
        f"|  | (effects range {float(res.values.min()):.3f} .. {float(res.values.max()):.3f}, TL's "
        f"{float(res_tl.min()):.3f} .. {float(res_tl.max()):.3f}: the comparison is not of constants; full-width bound "
        f"{n_bound * median(t_full):.2f} s = {n_bound:.0f} x {median(t_full):.3f}) |",
        flush=True,
    )
    size = f"{args.contexts} ctx x {n_ex} ex ({tokens} tok)" + (
        "" if args.last_m is None else f", last {args.last_m} flipped"
    )
    add_row(
        args.rows,
        bench="P1",
        model=loaded.name,
        size=size,
        pair=pair.description,
        reused_prefix=p0,
        width=width,
        full_readout_forward_times=t_full,
        bound_forward="readout forward of positions p0.. over the cached prefix"
        if p0
        else "readout forward (full width)",
        ours="Patcher.sweep('head_out')",
        reference="TL get_act_patch_attn_head_out_all_pos",
        ours_times=t_o,
        ref_times=t_r,
        readout_forward_times=t_ro,
        n_bound_forwards=n_bound,
        max_diff=diff,
        raw_ld_max_diff=raw,
        normaliser=tl_clean - tl_corr,
        ours_peak_mb=max(m_o),
        ref_peak_mb=max(m_r),
        model_rss_mb=rss_model,
        goal="ratio >= 10 (Gemma), time <= 1.3 x bound, diff <= 1e-4",
    )
    if peer_sweep is not None:
        peer_row(args, loaded.name, size, pair, (t_o, t_r, t_n), (res, res_tl, res_nn), (max(m_o), max(m_n)), rss_model)
    return pair, res


def peer_row(args, model_name: str, size: str, pair, times, values, peaks, rss_model: float) -> None:
    """Print and record nnsight's line of one size: its times against mechicl's and TL's (same repeats), and its
    effects' max difference from each (normalised scale, each side's own baselines; and from mechicl's raw mean
    logit differences)."""
    (t_o, t_r, t_n), (ours, ref_tl, peer), (peak_o, peak_n) = times, values, peaks
    d_ours, d_tl = float((peer.values - ours.values).abs().max()), float((peer.values - ref_tl).abs().max())
    raw = float((peer.logit_diff - ours.logit_diff.mean(-1)).abs().max())  # each side's own patched runs
    per = median([n / o for n, o in zip(t_n, t_o)])
    version = nnsight_version()
    print(
        f"|  | nnsight {version} (trace loop over NNsight(plain HF), {len(t_n)} repeats): **{median(t_n):.2f} s**; "
        f"nnsight / mechicl **{median(t_n) / median(t_o):.2f}x** (per-repeat {per:.2f}x), nnsight / TL "
        f"{median(t_n) / median(t_r):.2f}x (per-repeat {median([n / r for n, r in zip(t_n, t_r)]):.2f}x); "
        f"max diff vs mechicl {d_ours:.1e} {verdict(d_ours <= 1e-4)} (norm.; raw LD {raw:.1e}), "
        f"vs TL {d_tl:.1e} (norm.); nnsight peak MB {peak_n:.0f} |",
        flush=True,
    )
    add_row(
        args.rows,
        bench="P1-nnsight",
        model=model_name,
        size=size,
        pair=pair.description,
        ours="Patcher.sweep('head_out')",
        reference=f"nnsight {version} trace loop (NNsight of the plain HF model)",
        ours_times=t_o,
        ref_times=t_n,
        tl_times=t_r,
        max_diff=d_ours,
        max_diff_vs_tl=d_tl,
        raw_ld_max_diff=raw,
        ours_peak_mb=peak_o,
        ref_peak_mb=peak_n,
        model_rss_mb=rss_model,
    )


def resid_sweep(loaded, task, args, rss_model: float) -> None:
    """``--resid``: the report's residual sweep, full width (before) against suffix re-runs (after), one process."""
    import mechicl.analysis.patching.exact as exact
    from mechicl.analysis.engine.prefix_reuse import suffix_groups
    from mechicl.analysis.patching.exact import Patcher
    from mechicl.data.pairs import pair_for
    from mechicl.runs.report_data import ReportConfig

    cfg = ReportConfig(model=loaded.name)
    pair = pair_for(loaded, task, cfg.n_patch, cfg.n_examples, seed=cfg.seed)
    c, n = pair.clean, cfg.resid_examples
    lo, hi = int(c.input_spans[:, -n, 0].min()), int(c.readout_pos[:, -1].max()) + 1
    cells = [(l, p) for l in range(int(loaded.model.cfg.n_layers)) for p in range(lo, hi)]

    def sweep(reuse: bool):
        return lambda: Patcher(loaded.model, pair, prefix_reuse=reuse).sweep("resid", "denoise", cells)

    sweep(True)()  # warm-up
    t_b, t_a, m_b, m_a = [], [], [], []
    for _ in range(args.repeats):
        dt, mb, before = timed(sweep(False))
        t_b.append(dt), m_b.append(mb)
        dt, mb, after = timed(sweep(True))
        t_a.append(dt), m_a.append(mb)
    diff = float((after.values - before.values).abs().max())
    per = median([b / a for b, a in zip(t_b, t_a)])
    print(
        f"resid sweep, {loaded.name} {task.name}, report defaults: {cfg.n_patch} contexts x {cfg.n_examples} examples "
        f"(width {int(pair.query_pos.max()) + 1}), positions {lo}..{hi - 1} x {len(cells) // (hi - lo)} layers, "
        f"1 thread, median of {args.repeats} interleaved repeats; machine: {MACHINE}"
    )
    print("| variant | s (median) | fwd-equiv | peak MB |\n|---|---|---|---|")
    print(f"| before: full width from the patched layer | {median(t_b):.2f} | {before.forwards:.1f} | {max(m_b):.0f} |")
    print(f"| after: positions p.. over the KV cache | {median(t_a):.2f} | {after.forwards:.1f} | {max(m_a):.0f} |")
    for name, cost in (("one call per cell", 0.0), ("fewest calls", 1e9)):
        orig = exact.suffix_groups
        exact.suffix_groups = lambda *a, cost=cost, **k: suffix_groups(*a, call_cost=cost)
        try:
            dt, mb, res = timed(sweep(True))
        finally:
            exact.suffix_groups = orig
        print(f"| after, {name} (once) | {dt:.2f} | {res.forwards:.1f} | {mb:.0f} |")
    print(
        f"ratio before / after: **{median(t_b) / median(t_a):.2f}x** (median per-repeat {per:.2f}x); "
        f"max |after - before| {diff:.1e} (normalised)"
    )
    add_row(
        args.rows,
        bench="resid-suffix",
        model=loaded.name,
        size=f"{cfg.n_patch} ctx x {cfg.n_examples} ex, positions {lo}..{hi - 1}",
        ours="Patcher.sweep('resid'), suffix re-runs",
        reference="Patcher(prefix_reuse=False).sweep('resid'), full width",
        ours_times=t_a,
        ref_times=t_b,
        max_diff=diff,
        ours_peak_mb=max(m_a),
        ref_peak_mb=max(m_b),
        model_rss_mb=rss_model,
    )


def extras(loaded, pair, res_ours, repeats: int) -> None:
    """Attribution patching, the readout-slot sweep and start_at_layer, on one pair."""
    from mechicl.analysis.engine.hooks import run_to_final
    from mechicl.analysis.patching.attribution import agreement, attribution_patch
    from mechicl.analysis.patching.exact import Patcher

    model = loaded.model
    L = int(model.cfg.n_layers)
    tokens = pair.corrupted.tokens
    with torch.no_grad():
        t_fwd = _median_time(lambda: model(tokens), 3)[0]
        t_ro = _median_time(lambda: run_to_final(model, tokens), 3)[0]
    attribution = lambda: attribution_patch(model, pair, ("head_out",), "denoise")["head_out"]  # noqa: E731
    attribution()
    t_attr, res_attr = _median_time(attribution, repeats)
    t_readout, res_readout = _median_time(lambda: Patcher(model, pair).sweep("head_out_readout", "denoise"), repeats)
    agr = agreement(res_attr.values, res_ours.values, k=10)
    with torch.no_grad():  # start_at_layer: exact, but does it save compute?
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_pre"))
        resid_last = cache[f"blocks.{L - 1}.hook_resid_pre"]
        sal_diff = float((model(tokens) - model(resid_last, start_at_layer=L - 1)).abs().max())
        t_sal = _median_time(lambda: model(resid_last, start_at_layer=L - 1), 3)[0]
        t_skip = _median_time(lambda: run_to_final(model, tokens, start=(L - 1, resid_last)), 3)[0]
    print("\n| measurement (last size) | value |")
    print("|---|---|")
    print(
        f"| mechicl readout-slot head sweep (KV re-run of the query token) | {t_readout:.2f} s "
        f"({res_readout.forwards:.2f} readout-forward equivalents, incl. 2 baseline and 2 prefix runs) |"
    )
    print(f"| one full forward `model(tokens)` | {t_fwd:.3f} s |")
    print(f"| one readout forward (stops at ln_final, label logits only) | {t_ro:.3f} s |")
    print(
        f"| attribution patching, all heads (2 fwd + 1 bwd) | {t_attr:.3f} s = **{t_attr / t_fwd:.2f}** full forwards "
        f"{verdict(t_attr / t_fwd <= 3)} (target <= 3) = {t_attr / t_ro:.2f} readout forwards |"
    )
    print(
        f"| attribution vs exact: Spearman | **{agr['spearman']:.3f}** {verdict(agr['spearman'] >= 0.8)} (target >= 0.8); "
        f"Pearson {agr['pearson']:.3f}; top-10 overlap {agr['topk_overlap']:.2f} |"
    )
    print(
        f"| bridge start_at_layer={L - 1} vs full forward | {t_sal:.3f} s vs {t_fwd:.3f} s "
        f"({t_sal / t_fwd:.2f}x of a full forward; logits max diff {sal_diff:.1e}) |"
    )
    print(
        f"| mechicl block skipping from layer {L - 1} (readout only) | {t_skip:.3f} s ({t_skip / t_ro:.2f}x of a readout forward) |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--task", default="vader-words")
    ap.add_argument("--contexts", type=int, default=4, help="contexts (default 4; TL time grows linearly)")
    ap.add_argument("--examples", default="8,32", help="comma list of examples per context (default 8,32)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--last-m", type=int, default=None, help="flip only the last M demonstration labels (default: all)")
    ap.add_argument(
        "--no-extras", action="store_true", help="skip attribution patching, the readout sweep and start_at_layer"
    )
    ap.add_argument("--resid", action="store_true", help="only the report's residual sweep, before / after")
    ap.add_argument("--rows", type=Path, default=None, help="append result rows (JSON lines) for benchmarks/table.py")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from tqdm.auto import tqdm

    tqdm.__init__ = partialmethod(tqdm.__init__, disable=True)  # TL's per-cell progress bar
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.helpers
    from mechicl.data.tasks import load_task
    from mechicl.models.loading import load_model

    t0 = time.perf_counter()
    loaded, task = load_model(args.model), load_task(args.task)
    rss_model = rss_mb()
    if args.resid:
        resid_sweep(loaded, task, args, rss_model)
        print(f"\ntotal benchmark wall time {time.perf_counter() - t0:.0f} s")
        return
    L, H = int(loaded.model.cfg.n_layers), int(loaded.model.cfg.n_heads)
    peer = nnsight_peer(loaded.model)
    print(
        f"P1 all-heads output patching, {loaded.name} ({L} layers x {H} heads), task {task.name}, 1 thread, "
        f"median of {args.repeats} interleaved repeats; RSS after load {rss_model:.0f} MB; machine: {MACHINE}"
    )
    print(
        "| examples, pair | contexts x tokens, positions mechicl re-runs | mechicl s | TL s | ratio (goal >= 10 on Gemma) | per-repeat ratio "
        "| max diff (norm.) | max diff (raw LD) | FLOP bound s (readout fwds of the re-run positions x s) | mechicl / bound (goal <= 1.3) "
        "| mechicl fwd-equiv | mechicl peak MB | TL peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    pair = res = None
    for n_ex in (int(x) for x in args.examples.split(",")):
        pair, res = measure_size(loaded, task, args, n_ex, rss_model, peer)
    if not args.no_extras:
        extras(loaded, pair, res, args.repeats)
    print(f"\ntotal benchmark wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
