"""Long contexts (issue 14): the behaviour readout, the readout-slot stepper and the head sweeps at k up to 64, with
cost per 1k tokens.

    python benchmarks/bench_long_context.py [--model gemma3-270m] [--task vader-words] [--k 8,16,32,64]
        [--analyses readout,head_out_readout,head_out,head_out_last2,attribution] [--repeats 3] [--seed 0]
        [--check-tl] [--rows FILE]

One context of ``k`` examples per size, 1 thread, medians of ``--repeats`` (each analysis's repeats back to
back, one warm-up call first). Per (analysis, k): tokens of the context, median seconds, seconds per 1k tokens
(median s / tokens x 1000), receiver-forward equivalents where the result reports them (``PatchResult.forwards``),
peak RSS of the step (``_common.timed``; the loaded model is in it), whether every value is finite, and the
largest difference from an independent reference that never goes through the code under test:

* ``readout``: ``run_to_final`` + ``unembed_labels`` at all k slots (``bench_readout.py``'s one-forward side).
  Reference: the full logits of a plain Hugging Face model loaded afresh from the model's cached directory
  (not ``model.original_model``: the bridge swaps its own components into the model it wraps), one forward.
* ``head_out_readout``: ``Patcher(model, pair).sweep("head_out_readout", "denoise")`` (two ``ReadoutStepper``s;
  the stepper's mode, ``kv`` or ``full``, is printed: Gemma-3 contexts longer than its 512-token sliding
  window fall back to full forwards). Reference: a ``run_with_hooks`` forward per spot-checked head patching its
  ``hook_z`` at the query slot, baselines from plain forwards.
* ``head_out`` / ``head_out_last2``: ``Patcher(model, pair).sweep("head_out", "denoise")`` with every
  demonstration label flipped / only the last 2 (``pair_for(..., last_m=2)``, as ``bench_patching.py --last-m``).
  Reference: a ``run_with_hooks`` forward per spot-checked head patching its ``hook_z`` at every position;
  with ``--check-tl`` (``head_out`` only, largest k only) also TransformerLens's
  ``get_act_patch_attn_head_out_all_pos`` over every head (~90 s at 277 tokens on Gemma, grows with tokens).
* ``attribution``: ``attribution_patch(model, pair, ("head_out",))`` (2 forwards + 1 backward); finite only.

Spot-checked heads: first, middle and last layer (3 forward passes + 2 baselines per check).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from functools import partialmethod
from pathlib import Path

import torch
from _common import add_row, median, rss_mb, timed

ANALYSES = ("readout", "head_out_readout", "head_out", "head_out_last2", "attribution")


def spot_reference(
    model, pair, heads: list[tuple[int, int]], readout_only: bool
) -> tuple[dict[tuple[int, int], float], float, float]:
    """Mean logit difference of each head patched clean -> corrupted (``hook_z`` at the query slot if
    ``readout_only``, else at every position) and the clean and corrupted baselines: plain bridge forwards
    with full logits (``tests.helpers.hooked_head_patch``)."""
    from tests.helpers import hooked_head_patch

    ld, clean_ld, corr_ld = hooked_head_patch(model, pair, heads, readout_only)
    return dict(zip(heads, ld.tolist())), clean_ld, corr_ld


def tl_all_pos(loaded, pair) -> torch.Tensor:
    """TransformerLens's all-position head-output sweep with the normalised metric (baselines from full forwards)."""
    import transformer_lens.patching as tlp

    from tests.helpers import tl_metric

    metric = tl_metric(loaded, pair)
    with torch.no_grad():
        _, clean_cache = loaded.model.run_with_cache(pair.clean.tokens)
        return tlp.get_act_patch_attn_head_out_all_pos(loaded.model, pair.corrupted.tokens, clean_cache, metric)


def plain_hf(name: str):
    """A fresh Hugging Face model from ``name``'s cached directory, never wrapped by the bridge (the bridge swaps
    its own components into the model it wraps, so ``model.original_model`` runs through them), or None."""
    from transformers import AutoModelForCausalLM

    from mechicl.data.fetch import cache_dir

    dirs = sorted((cache_dir() / "models").glob(f"{name}-*/config.json"))
    if not dirs:
        return None
    return AutoModelForCausalLM.from_pretrained(
        str(dirs[0].parent), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def readout_step(loaded, pair):
    """The one-forward readout of all k slots and its reference (a plain HF model's full logits)."""
    from mechicl.analysis.engine.hooks import run_to_final
    from mechicl.analysis.engine.readout import unembed_labels

    b, m = pair.clean, loaded.model
    n = int(b.lengths[0])

    @torch.no_grad()
    def ours() -> torch.Tensor:
        resid = run_to_final(m, b.tokens[:, :n])[0]
        return unembed_labels(m, resid[b.readout_pos[0]], b.label_token_ids)

    def check(out: torch.Tensor) -> tuple[None, float | None]:
        """(no normalised metric, largest difference of the label logits); loaded after the timed calls, then freed."""
        hf = plain_hf(loaded.name)
        if hf is None:
            return None, None
        with torch.no_grad():
            ref = hf(b.tokens[:, :n]).logits[0][b.readout_pos[0]][:, b.label_token_ids]
        del hf
        return None, float((out - ref).abs().max())

    return ours, check


def sweep_step(loaded, pair, kind: str):
    """A fresh Patcher's sweep and its spot check against plain hooked forwards."""
    from mechicl.analysis.patching.exact import Patcher

    model = loaded.model
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    heads = [(0, 0), (L // 2, H // 2), (L - 1, H - 1)]
    last: dict = {}

    def ours():
        last["patcher"] = Patcher(model, pair)
        return last["patcher"].sweep(kind, "denoise")

    def check(res) -> tuple[float, float]:
        """Largest difference over the spot-checked heads: normalised metric (each side by its own baselines), raw LD."""
        ref, clean, corr = spot_reference(model, pair, heads, readout_only=kind == "head_out_readout")
        norm = max(abs(float(res.values[l, h]) - (v - corr) / (clean - corr)) for (l, h), v in ref.items())
        raw = max(abs(float(res.logit_diff[l, h].mean()) - v) for (l, h), v in ref.items())
        return norm, raw

    return ours, check, last


def measure(loaded, task, analysis: str, k: int, args, rss_model: float) -> None:
    """One (analysis, k): warm-up, repeats, checks; prints a row and appends it to ``--rows``."""
    from mechicl.analysis.patching.attribution import attribution_patch
    from mechicl.data.pairs import pair_for

    pair = pair_for(loaded, task, 1, k, seed=args.seed, last_m=2 if analysis == "head_out_last2" else None)
    tokens = int(pair.clean.lengths[0])
    if analysis == "readout":
        fn, check = readout_step(loaded, pair)
        ours, ref = "run_to_final + unembed_labels at all k slots", "plain HF model's full logits (not bridged)"
    elif analysis == "attribution":
        fn = lambda: attribution_patch(loaded.model, pair, ("head_out",), "denoise")["head_out"]  # noqa: E731
        check, ours, ref = None, "attribution_patch(head_out)", "-"
    else:
        fn, check, last = sweep_step(loaded, pair, "head_out_readout" if analysis == "head_out_readout" else "head_out")
        ours = f"Patcher.sweep('{'head_out_readout' if analysis == 'head_out_readout' else 'head_out'}')"
        ref = "run_with_hooks per head (3 spot-checked heads)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()  # warm up
    notes = sorted({str(w.message).split(";")[0][:90] for w in caught})
    times, peaks, res = [], [], None
    for _ in range(args.repeats):
        dt, mb, res = timed(fn)
        times.append(dt), peaks.append(mb)
    values = res if isinstance(res, torch.Tensor) else res.values
    finite = bool(torch.isfinite(values).all())
    if not isinstance(res, torch.Tensor) and hasattr(res, "logit_diff"):
        finite = finite and bool(torch.isfinite(res.logit_diff).all())
    diff, raw = check(res) if check is not None else (None, None)
    forwards = getattr(res, "forwards", None) if analysis != "attribution" else None
    mode = last["patcher"].stepper("corrupted").mode if analysis == "head_out_readout" else ""  # built by the sweep
    norm_by = (
        None
        if isinstance(res, torch.Tensor) or not hasattr(res, "clean_ld")
        else float(res.clean_ld.mean() - res.corrupted_ld.mean())
    )  # clean - corrupted LD: a small one amplifies the normalised diff
    s = median(times)
    per_1k = s / tokens * 1000
    tl_diff = None
    if args.check_tl and analysis == "head_out" and k == args.k_list[-1]:
        t = time.perf_counter()
        tl = tl_all_pos(loaded, pair)
        tl_diff = float((res.values - tl).abs().max())
        diff = max(diff, tl_diff)
        notes.append(f"TL all-pos sweep: max diff {tl_diff:.1e}, {time.perf_counter() - t:.0f} s")
    print(
        f"| {analysis} | {k} | {tokens} | {s:.2f} | {per_1k:.3f} | {fmt(forwards, '.1f')} | {mode or '-'} "
        f"| {max(peaks):.0f} | {'yes' if finite else '**NO**'} | {fmt(diff, '.1e')} | {fmt(raw, '.1e')} | {fmt(norm_by, '.3f')} "
        f"| {'; '.join(notes) or '-'} |",
        flush=True,
    )
    add_row(
        args.rows,
        bench="long-context",
        model=loaded.name,
        size=f"1 ctx x {k} ex ({tokens} tok), {analysis}",
        tokens=tokens,
        k=k,
        analysis=analysis,
        pair=pair.description,
        ours=ours
        + (f", {forwards:.1f} fwd-equiv" if forwards is not None else "")
        + (f", stepper {mode}" if mode else ""),
        reference=ref,
        ours_times=times,
        ref_times=[],
        max_diff=diff if diff is not None else raw,
        raw_max_diff=raw,
        normaliser=norm_by,
        tl_max_diff=tl_diff,
        forwards=forwards,
        stepper_mode=mode or None,
        finite=finite,
        notes=notes,
        s_per_1k_tokens=per_1k,
        ours_peak_mb=max(peaks),
        ref_peak_mb=None,
        model_rss_mb=rss_model,
        goal="finite, equal to the references (<= 1e-4), cost stated per 1k tokens",
    )


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--task", default="vader-words")
    ap.add_argument("--k", default="8,16,32,64", help="comma list of examples per context (default 8,16,32,64)")
    ap.add_argument("--analyses", default=",".join(ANALYSES), help=f"comma list of {', '.join(ANALYSES)} (default all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--check-tl",
        action="store_true",
        help="also compare the head_out sweep at the largest k with TransformerLens's all-position sweep (slow)",
    )
    ap.add_argument("--rows", type=Path, default=None, help="append result rows (JSON lines) for benchmarks/table.py")
    args = ap.parse_args()
    args.k_list = [int(x) for x in args.k.split(",")]
    analyses = args.analyses.split(",")
    bad = [a for a in analyses if a not in ANALYSES]
    if bad:
        ap.error(f"unknown analyses {bad}; choose from {', '.join(ANALYSES)}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)

    from tqdm.auto import tqdm

    tqdm.__init__ = partialmethod(tqdm.__init__, disable=True)  # TL's per-cell progress bar
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.helpers
    from mechicl.data.tasks import load_task
    from mechicl.models.loading import load_model

    t0 = time.perf_counter()
    loaded, task = load_model(args.model), load_task(args.task)
    rss_model = rss_mb()
    print(
        f"Long contexts, {loaded.name} (n_ctx {loaded.n_ctx}), task {task.name}, 1 context, 1 thread, "
        f"median of {args.repeats} repeats; RSS after load {rss_model:.0f} MB"
    )
    print(
        "| analysis | k | tokens | median s | s per 1k tokens | fwd-equiv | stepper | peak MB | finite "
        "| max diff vs reference (norm.) | max diff (raw LD / logits) | normaliser | notes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in args.k_list:
        for analysis in analyses:
            measure(loaded, task, analysis, k, args, rss_model)
    print(f"\ntotal benchmark wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
