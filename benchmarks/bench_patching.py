"""Exact and attribution patching against TransformerLens 4.3, side by side in one process.

    .venv/bin/python benchmarks/bench_patching.py [--model gemma3-270m] [--contexts 4] [--examples 8] [--repeats 2]

On the default embedded model: an all-heads output patching sweep (``hook_z`` at
every position), correct -> flipped labels (denoising), with

* mechicl: ``Patcher(model, pair).sweep("head_out")`` (fresh Patcher each repeat, so
  its two cached runs are included), and
* TransformerLens: ``run_with_cache`` of the clean run +
  ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos`` with the same
  normalised metric (the corrupted baseline it needs is not timed: favours TL).

Both on the same prompts, 1 thread, repeats interleaved, medians reported (and the
median of the per-repeat ratios, robust to a noisy neighbour on a shared machine). Then:
attribution patching (2 forwards + 1 backward) timed in forward-equivalents and its
Spearman / top-10 overlap against the exact sweep; and a check of the bridge's
``start_at_layer`` (does it save compute?) against mechicl's block skipping.
Targets: exact >= 4x faster with max |diff| <= 1e-4; attribution <= 3
forward-equivalents with Spearman >= 0.8. Misses are printed as MISS.

The difference is float32 noise: mechicl unembeds two label columns, TL the whole
vocabulary, and the two GEMMs round differently (~1e-5 in the raw logit
difference). The normalised metric divides by (clean - corrupted), so a pair with a
small normaliser amplifies it; the raw difference is printed next to it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--task", default="vader-words")
    ap.add_argument("--contexts", type=int, default=4, help="contexts (default 4; TL time grows linearly)")
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats (default 2: ~6 min on one thread)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import transformer_lens.patching as tlp
    from tqdm.auto import tqdm
    from functools import partialmethod

    tqdm.__init__ = partialmethod(tqdm.__init__, disable=True)  # TL's per-cell progress bar

    from mechicl.analysis.attribution_patching import agreement, attribution_patch
    from mechicl.analysis.hooks import run_to_final
    from mechicl.analysis.patching import Patcher
    from mechicl.data.pairs import pair_for
    from mechicl.data.tasks import load_task
    from mechicl.models.loading import load_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.helpers
    from tests.helpers import tl_metric

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    model = loaded.model
    task = load_task(args.task)
    pair = pair_for(loaded, task, args.contexts, args.examples, seed=args.seed)
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    print(f"model {loaded.name} ({L} layers x {H} heads), task {task.name}: {args.contexts} contexts x {args.examples} "
          f"examples, {pair.clean.tokens.shape[1]} tokens max; 1 thread; median of {args.repeats} interleaved repeats")

    metric = tl_metric(loaded, pair)  # TL's metric, its baselines from full forwards
    ref = Patcher(model, pair)
    clean_ld, corr_ld = ref.baseline("clean"), ref.baseline("corrupted")

    def ours():
        return Patcher(model, pair).sweep("head_out", "denoise")

    def tl():
        with torch.no_grad():
            _, clean_cache = model.run_with_cache(pair.clean.tokens)
            return tlp.get_act_patch_attn_head_out_all_pos(model, pair.corrupted.tokens, clean_cache, metric)

    def plain_forward():
        with torch.no_grad():
            return model(pair.corrupted.tokens)

    def readout_forward():
        with torch.no_grad():
            return run_to_final(model, pair.corrupted.tokens)

    def attribution():
        return attribution_patch(model, pair, ("head_out",), "denoise")["head_out"]

    def readout_sweep():
        return Patcher(model, pair).sweep("head_out_readout", "denoise")

    # warm up every path once
    ours(), plain_forward(), readout_forward(), attribution()
    t_ours, t_tl, t_fwd, t_ro, t_attr = [], [], [], [], []
    res_ours = res_tl = res_attr = None
    for _ in range(args.repeats):
        dt, res_ours = _median_time(ours, 1)
        t_ours.append(dt)
        dt, res_tl = _median_time(tl, 1)
        t_tl.append(dt)
        t_fwd.append(_median_time(plain_forward, 3)[0])
        t_ro.append(_median_time(readout_forward, 3)[0])
        dt, res_attr = _median_time(attribution, 1)
        t_attr.append(dt)
    m_ours, m_tl, m_fwd, m_ro, m_attr = map(statistics.median, (t_ours, t_tl, t_fwd, t_ro, t_attr))
    diff = float((res_ours.values - res_tl).abs().max())
    ratio = m_tl / m_ours
    ratio_per_repeat = statistics.median(a / b for a, b in zip(t_tl, t_ours))
    t_readout, res_readout = _median_time(readout_sweep, args.repeats)
    agr = agreement(res_attr.values, res_ours.values, k=10)

    # start_at_layer: exact, but does it save compute? (resume at the last block vs a full forward)
    with torch.no_grad():
        _, cache = model.run_with_cache(pair.corrupted.tokens, names_filter=lambda n: n.endswith("hook_resid_pre"))
        resid_last = cache[f"blocks.{L - 1}.hook_resid_pre"]
        full_logits = model(pair.corrupted.tokens)
        sal_logits = model(resid_last, start_at_layer=L - 1)
        sal_diff = float((full_logits - sal_logits).abs().max())
        t_sal = _median_time(lambda: model(resid_last, start_at_layer=L - 1), 3)[0]
        t_skip = _median_time(lambda: run_to_final(model, pair.corrupted.tokens, start=(L - 1, resid_last)), 3)[0]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    print()
    print("| measurement | value |")
    print("|---|---|")
    print(f"| TL get_act_patch_attn_head_out_all_pos ({L * H} heads) | {m_tl:.2f} s |")
    print(f"| mechicl Patcher.sweep('head_out') | {m_ours:.2f} s ({res_ours.forwards:.1f} readout-forward equivalents) |")
    print(f"| speed-up (ratio of medians) | **{ratio:.2f}x** {verdict(ratio >= 4)} (target >= 4x); median of per-repeat ratios {ratio_per_repeat:.2f}x |")
    denom = float(clean_ld.mean() - corr_ld.mean())
    print(f"| max abs diff vs TL (normalised metric) | **{diff:.2e}** {verdict(diff <= 1e-4)} (target <= 1e-4); in raw logit "
          f"difference {diff * abs(denom):.1e} (normaliser clean - corrupted = {denom:.3f}) |")
    print(f"| mechicl readout-slot head sweep ({L * H} heads, KV re-run of the query token) | {t_readout:.2f} s "
          f"({res_readout.forwards:.2f} readout-forward equivalents, incl. 2 baseline and 2 prefix runs) |")
    print(f"| one full forward `model(tokens)` | {m_fwd:.3f} s |")
    print(f"| one readout forward (stops at ln_final, label logits only) | {m_ro:.3f} s |")
    print(f"| attribution patching, all heads (2 fwd + 1 bwd) | {m_attr:.3f} s = **{m_attr / m_fwd:.2f}** full forwards "
          f"{verdict(m_attr / m_fwd <= 3)} (target <= 3) = {m_attr / m_ro:.2f} readout forwards |")
    print(f"| attribution vs exact: Spearman | **{agr['spearman']:.3f}** {verdict(agr['spearman'] >= 0.8)} (target >= 0.8); "
          f"Pearson {agr['pearson']:.3f}; top-10 overlap {agr['topk_overlap']:.2f} |")
    print(f"| bridge start_at_layer={L - 1} vs full forward | {t_sal:.3f} s vs {m_fwd:.3f} s "
          f"({t_sal / m_fwd:.2f}x of a full forward; logits max diff {sal_diff:.1e}) |")
    print(f"| mechicl block skipping from layer {L - 1} (readout only) | {t_skip:.3f} s ({t_skip / m_ro:.2f}x of a readout forward) |")
    print(f"\nall times: ours {[round(x, 2) for x in t_ours]}, TL {[round(x, 2) for x in t_tl]}, "
          f"attribution {[round(x, 3) for x in t_attr]}; total benchmark wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
