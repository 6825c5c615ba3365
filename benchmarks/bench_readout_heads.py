"""P1b: the readout-slot head sweep (Halawi's ablation site) against a TransformerLens loop, side by side.

    python benchmarks/bench_readout_heads.py [--model gemma3-270m] [--contexts 4] [--examples 8,32] [--repeats 3]

Every head's output (``hook_z``) is patched at the query readout slot only, clean -> corrupted
(denoising), one head per cell, with the normalised logit-difference metric of
``mechicl.analysis.patching.exact``:

* mechicl: ``Patcher(model, pair).sweep("head_out_readout")`` (a fresh Patcher per repeat, so its
  baselines and its two ``ReadoutStepper`` prefix runs are timed);
* mechicl, ``ReadoutStepper`` used directly (its public API): one stepper per run, the clean
  stepper's ``z`` as donor, the baselines from the steppers' own ``base_logits`` (``Patcher``
  spends two more forwards on baselines: what a change there would save);
* TransformerLens: ``run_with_cache`` of the clean run (its ``hook_z`` and clean baseline), one
  plain forward of the corrupted run (its baseline), then one ``run_with_hooks`` forward per head
  with a hook on ``blocks.{l}.attn.hook_z`` that writes the clean output of that head at the query
  position only. Its baselines come from its own full forwards, never from mechicl; they are timed.

Repeats interleaved, 1 thread, medians; the ratio of medians and the median of the per-repeat
ratios; max |difference| of the normalised metric over all heads (goal <= 1e-4) and in raw logit
difference; peak RSS of each side (``_common.timed``). Goal: >= 50x faster.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from _common import add_row, median, rss_mb, timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.helpers
from tests.helpers import hooked_head_patch  # noqa: E402 - the reference, imported before anything is timed

warnings.filterwarnings("ignore")


def tl_readout_sweep(model, pair) -> torch.Tensor:
    """Normalised metric ``[layer, head]`` of every query-slot head patch, TransformerLens only
    (``tests.helpers.hooked_head_patch``: its baselines come from its own full forwards)."""
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    ld, clean_ld, corr_ld = hooked_head_patch(model, pair, [(l, h) for l in range(L) for h in range(H)], True)
    return ((ld - corr_ld) / (clean_ld - corr_ld)).view(L, H)


def stepper_sweep(model, pair) -> torch.Tensor:
    """The same sweep with two ``ReadoutStepper``s only: 2 prefix forwards + one re-run of the query token per head."""
    from mechicl.analysis.engine.hooks import head_masks
    from mechicl.analysis.engine.stepper import ReadoutStepper
    from mechicl.analysis.patching.result import normalise

    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    donor, recv = ReadoutStepper(model, pair.clean), ReadoutStepper(model, pair.corrupted)
    masks = head_masks([[(l, h)] for l in range(L) for h in range(H)], L, H)
    ld = pair.logit_diff(recv.run(masks, donor.z))  # [cells, batch]
    clean, corr = (pair.logit_diff(st.base_logits) for st in (donor, recv))
    return normalise(ld, clean, corr).view(L, H)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--task", default="vader-words")
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--examples", default="8,32", help="comma list of examples per context (default 8,32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=Path, default=None, help="append result rows (JSON lines) for benchmarks/table.py")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from mechicl.analysis.patching.exact import Patcher
    from mechicl.data.pairs import pair_for
    from mechicl.data.tasks import load_task
    from mechicl.models.loading import load_model

    loaded, task = load_model(args.model), load_task(args.task)
    model = loaded.model
    rss_model = rss_mb()
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    print(
        f"P1b readout-slot head sweep, {loaded.name} ({L} x {H} heads), task {task.name}, 1 thread, "
        f"median of {args.repeats} interleaved repeats; RSS after load {rss_model:.0f} MB"
    )
    print(
        "| examples | tokens | mechicl s | TL loop s | ratio | per-repeat ratio | max diff (norm.) | max diff (raw LD) "
        "| mechicl peak MB | TL peak MB | stepper mode | ReadoutStepper direct: s, ratio, diff, peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n_ex in (int(x) for x in args.examples.split(",")):
        pair = pair_for(loaded, task, args.contexts, n_ex, seed=args.seed)
        ours = lambda: Patcher(model, pair).sweep("head_out_readout", "denoise")  # noqa: E731
        ref = lambda: tl_readout_sweep(model, pair)  # noqa: E731
        direct = lambda: stepper_sweep(model, pair)  # noqa: E731
        ours(), direct()  # warm up (TL: one plain forward; a whole TL sweep would double the run)
        with torch.no_grad():
            model(pair.corrupted.tokens)
        t_o, t_r, t_d, m_o, m_r, m_d = [], [], [], [], [], []
        for _ in range(args.repeats):
            dt, mb, res = timed(ours)
            t_o.append(dt), m_o.append(mb)
            dt, mb, res_d = timed(direct)
            t_d.append(dt), m_d.append(mb)
            dt, mb, res_tl = timed(ref)
            t_r.append(dt), m_r.append(mb)
        diff = float((res.values - res_tl).abs().max())
        diff_d = float((res_d - res_tl).abs().max())
        ratio_d = median(t_r) / median(t_d)
        denom = abs(float(res.clean_ld.mean() - res.corrupted_ld.mean()))
        ratio, per = median(t_r) / median(t_o), median([r / o for r, o in zip(t_r, t_o)])
        mode = Patcher(model, pair).stepper("corrupted").mode
        ok = "PASS" if ratio >= 50 and diff <= 1e-4 else "MISS"
        tokens = int(pair.clean.tokens.shape[1])
        print(
            f"| {n_ex} | {args.contexts} x {tokens} | {median(t_o):.2f} | {median(t_r):.2f} | **{ratio:.1f}x** {ok} "
            f"| {per:.1f}x | {diff:.1e} | {diff * denom:.1e} | {max(m_o):.0f} | {max(m_r):.0f} | {mode} "
            f"| {median(t_d):.2f} s, **{ratio_d:.1f}x** {'PASS' if ratio_d >= 50 and diff_d <= 1e-4 else 'MISS'}, "
            f"diff {diff_d:.1e}, {max(m_d):.0f} MB |",
            flush=True,
        )
        add_row(
            args.rows,
            bench="P1b",
            model=loaded.name,
            size=f"{args.contexts} ctx x {n_ex} ex ({tokens} tok)",
            ours="Patcher.sweep('head_out_readout')",
            reference=f"TL run_with_hooks loop, {L * H} forwards",
            ours_times=t_o,
            ref_times=t_r,
            max_diff=diff,
            ours_peak_mb=max(m_o),
            ref_peak_mb=max(m_r),
            model_rss_mb=rss_model,
            goal="ratio >= 50, diff <= 1e-4",
        )
        add_row(
            args.rows,
            bench="P1b",
            model=loaded.name,
            size=f"{args.contexts} ctx x {n_ex} ex ({tokens} tok) direct",
            ours="2 ReadoutSteppers (baselines from their base_logits)",
            reference=f"TL run_with_hooks loop, {L * H} forwards",
            ours_times=t_d,
            ref_times=t_r,
            max_diff=diff_d,
            ours_peak_mb=max(m_d),
            ref_peak_mb=max(m_r),
            model_rss_mb=rss_model,
            goal="ratio >= 50, diff <= 1e-4",
        )


if __name__ == "__main__":
    main()
