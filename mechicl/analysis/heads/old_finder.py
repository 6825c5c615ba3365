"""The head finder: screen (attribution + exact readout-slot patching) -> confirm (exact patching)
-> validate (ablation on held-out contexts against the control of every other head / random sets).

``find_heads(model, pair, held_out, cfg)`` takes the screening pair and the held-out renderings
ready-made (``runs.heads`` builds them from disjoint context draws) and returns tidy tables.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mechicl.analysis.engine.hooks import Head, fmt_heads
from mechicl.analysis.heads.ablation import ABLATIONS, HeadAblator, summarize_control
from mechicl.analysis.patching.attribution import agreement, attribution_patch
from mechicl.analysis.patching.exact import Patcher, PatchResult
from mechicl.data.batches import AblationBatches
from mechicl.data.pairs import PatchPair
from mechicl.errors import ConfigError


@dataclass(frozen=True)
class HeadFinderConfig:
    """The head finder: screen -> confirm (exact patching) -> validate (ablation vs random sets).

    Screen: attribution patching of every head's output at all positions, plus exact
    patching at the readout slot (cheap one-token re-runs). Candidates: the top third
    of ``n_candidates`` by exact readout-slot effect, filled up by attribution rank.

    Cost on ``n_examples``-example contexts: attribution 2 forwards + 1 backward of
    ``n_screen`` contexts; exact all-position head patching of ``n_candidates`` heads
    in both directions (<= ``2 * n_candidates`` forwards of ``n_screen`` contexts, fewer
    for late layers); one forward of ``n_eval`` held-out contexts for each of the
    correct, flipped and shuffled renderings; then one-token re-runs for every
    ablation, control draw and head effect. Memory: the prefix KV caches of the
    held-out contexts plus ``max_rows`` rows of one step.
    """

    model: str = ""  # filled by ``find_heads`` with the model that ran (its ``name``)
    task: str = ""  # filled by ``find_heads`` with the task that ran (the pair's task name)
    n_examples: int = 17  # examples per context, the last is the query (k = n_examples - 1 observed)
    n_screen: int = 16
    n_eval: int = 64
    n_candidates: int = 12
    set_sizes: tuple[int, ...] = (1, 2, 4)
    n_control: int = 200
    ablation: str = "mean"  # the ablation the control and the headline use; both are reported per head
    seed: int = 0
    max_rows: int = 256

    def __post_init__(self) -> None:
        if self.n_examples < 2 or self.n_screen < 1 or self.n_eval < 2 or self.n_candidates < 1:
            raise ConfigError("need n_examples >= 2, n_screen >= 1, n_eval >= 2, n_candidates >= 1")
        if self.ablation not in ABLATIONS:
            raise ConfigError(f"ablation must be one of {ABLATIONS}")


@dataclass(frozen=True)
class HeadFinderResult:
    """Tables from ``find_heads``.

    ``heads``: the confirmed candidates, ranked by exact denoising effect (columns: rank,
      layer, head, attribution, patch_denoise, patch_noise, readout_patch_denoise,
      readout_patch_noise, gap_reduction_mean / _zero, gap_reduction_ci_low/high (bootstrap CI of the
      ``cfg.ablation`` column), gap_reduction_ptrue_mean (the same in P(true)), d_acc_correct_mean / _zero,
      d_acc_zero_shot_mean / _zero, fv_cie, and control_ci_high / control_p / n_other: the head's
      ``cfg.ablation`` gap reduction against the ``n_other`` other heads', each ablated alone).
      Every ablation-dependent column names its ablation (``_mean`` / ``_zero``): no unsuffixed copies.
    ``all_heads``: every (layer, head): attribution, exact readout-slot patching, gap reduction
      when ablated alone (the headline ablation), FV effect.
    ``sets``: the top-n sets: gap reduction with bootstrap CI, gap_reduction_ptrue, d_acc_correct, d_acc_zero_shot and the
      random-control summary (control_mean, control_ci_low/high, control_p, n_draws).
    ``control``: every control draw. ``baseline``: accuracies without ablation.
    ``agreement``: attribution vs exact (Spearman, top-k overlap). ``timings``: seconds per stage.
    """

    config: HeadFinderConfig
    model: str
    task: str
    heads: pd.DataFrame = field(repr=False)
    all_heads: pd.DataFrame = field(repr=False)
    sets: pd.DataFrame = field(repr=False)
    control: pd.DataFrame = field(repr=False)
    baseline: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    stepper_mode: str = ""

    @property
    def verdict(self) -> "Verdict":
        """Which head, if any, is found (the rule: ``Verdict``)."""
        return verdict(self.heads, self.config.ablation)

    @property
    def top_heads(self) -> list[Head]:
        return [(int(r.layer), int(r.head)) for r in self.heads.itertuples()]

    @property
    def seconds(self) -> float:
        return float(sum(self.timings.values()))


RULE = (
    "a head is found when the bootstrap 95% CI of its gap reduction ({ablation} ablation, held-out contexts) "
    "excludes 0 and its gap reduction exceeds every other head's, each ablated alone (control p at its floor "
    "1/(1 + other heads))"
)


@dataclass(frozen=True)
class Verdict:
    """The head finder's verdict: ``found`` (at most one head can pass, since it must beat every other), ``line``
    (one sentence, with the numbers) and ``rule`` (``RULE``). Being ranked first (by ``patch_denoise``) is not being found."""

    found: tuple[Head, ...]
    line: str
    rule: str


def p_text(p: float, n_other: int) -> str:
    """A Monte-Carlo p-value; at its floor 1/(1 + n) written ``p <= floor``."""
    if not np.isfinite(p):
        return "p n/a"
    return f"p <= {p:.3g}" if n_other and p <= 1 / (1 + n_other) + 1e-12 else f"p = {p:.3g}"


def verdict(heads: pd.DataFrame, ablation: str = "mean") -> Verdict:
    """Apply ``RULE`` to the candidates' table (``HeadFinderResult.heads``)."""
    rule = RULE.format(ablation=ablation)
    if heads.empty:
        return Verdict((), "Verdict: no head passes: there were no candidates.", rule)
    gr = heads[f"gap_reduction_{ablation}"]
    floor = 1 / (1 + heads["n_other"].clip(lower=1))
    ok = (heads.gap_reduction_ci_low > 0) & (heads.control_p <= floor + 1e-12) & np.isfinite(gr)

    def numbers(r: Any) -> str:
        g = getattr(r, f"gap_reduction_{ablation}")
        return (
            f"gap reduction {g:+.3f} [{r.gap_reduction_ci_low:+.3f}, {r.gap_reduction_ci_high:+.3f}], "
            f"{p_text(r.control_p, int(r.n_other))} against {int(r.n_other)} other heads"
        )

    if ok.any():
        r = heads[ok].iloc[0]
        line = (
            f"Verdict: L{int(r.layer)}H{int(r['head'])} is the only head whose gap reduction CI excludes 0 and exceeds "
            f"every other head's ({numbers(r)})."
        )
        return Verdict(((int(r.layer), int(r["head"])),), line, rule)
    best = heads.loc[gr.fillna(-np.inf).idxmax()]
    line = (
        f"Verdict: no head passes (CI of the gap reduction excludes 0 and it exceeds every other head's); the "
        f"largest gap reduction, L{int(best.layer)}H{int(best['head'])}: {numbers(best)}."
    )
    return Verdict((), line, rule)


@dataclass(frozen=True)
class _Screen:
    """What the screening stage hands on: attribution grids, exact readout-slot sweeps, candidates."""

    attribution: dict[str, Any]
    readout_denoise: PatchResult
    readout_noise: PatchResult
    candidates: list[Head]


def _screen(model: Any, patcher: Patcher, cfg: HeadFinderConfig) -> _Screen:
    """Attribution patching of every head, plus exact readout-slot patching of every head (one-token
    re-runs: cheap), which catches heads attribution misjudges at the readout slot."""
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    attr = attribution_patch(model, patcher.pair, ("head_out", "head_out_readout"), "denoise")
    rd = patcher.sweep("head_out_readout", "denoise")
    rn = patcher.sweep("head_out_readout", "noise")
    n_cand = min(cfg.n_candidates, L * H)
    order = [(int(i) // H, int(i) % H) for i in attr["head_out"].values.reshape(-1).abs().argsort(descending=True)]
    by_readout = [(int(i) // H, int(i) % H) for i in rd.values.reshape(-1).abs().argsort(descending=True)]
    candidates = list(dict.fromkeys(by_readout[: max(1, n_cand // 3)] + order))[:n_cand]
    return _Screen(attr, rd, rn, candidates)


def _baseline(abl: HeadAblator) -> dict[str, float]:
    bc, bf = abl.base["correct"], abl.base["flipped"]
    baseline = {
        "acc_correct": float(bc["correct"].mean()),
        "acc_flipped": float(bf["correct"].mean()),
        "p_correct": float(bc["p_true"].mean()),
        "p_flipped": float(bf["p_true"].mean()),
        "acc_zero_shot": float(abl.base["zero_shot"]["correct"].mean()),
    }
    baseline["gap"] = baseline["acc_correct"] - baseline["acc_flipped"]
    return baseline


def _set_controls(
    abl: HeadAblator,
    ranked: list[Head],
    single: pd.DataFrame,
    each: pd.DataFrame,
    cfg: HeadFinderConfig,
    progress: bool,
) -> tuple[list[dict], list[pd.DataFrame]]:
    """Each top-n set's gap reduction against same-size control sets (size 1: every other head once)."""
    sizes = sorted({s for s in cfg.set_sizes if 1 <= s <= len(ranked)})
    set_rows, controls = [], []
    for s in tqdm(sizes, desc="random control", unit="size", disable=not progress, leave=False):
        top = sorted(ranked[:s])
        if s == 1:  # the top head alone was ablated above; its control is every other head once
            row = single.iloc[0].to_dict()
            ctrl = each[each.heads != fmt_heads(top)].drop(columns=["gap_reduction_ci_low", "gap_reduction_ci_high"])
            ctrl = ctrl.reset_index(drop=True)
            ctrl.insert(0, "draw", np.arange(len(ctrl)))
        else:
            row = abl.gap_table([top], cfg.ablation, seed=cfg.seed).iloc[0].to_dict()
            ctrl = abl.random_control(s, cfg.n_control, seed=cfg.seed, exclude=top, ablation=cfg.ablation)
        controls.append(ctrl)
        row.update(summarize_control(row["gap_reduction"], ctrl["gap_reduction"].to_numpy()))
        row["heads"] = fmt_heads(ranked[:s])
        set_rows.append(row)
    return set_rows, controls


def _candidate_rows(
    ranked: list[Head],
    sc: _Screen,
    den: PatchResult,
    noi: PatchResult,
    single: dict[str, pd.DataFrame],
    each_gr: np.ndarray,
    fv: pd.DataFrame,
    cfg: HeadFinderConfig,
    n_heads: int,
) -> pd.DataFrame:
    """The ranked candidates' table (one row per head, every stage's number)."""
    fv_idx = fv.set_index(["layer", "head"])
    a_all, rd, rn = sc.attribution["head_out"].values, sc.readout_denoise, sc.readout_noise
    rows = []
    for rank, (l, h) in enumerate(ranked, 1):
        sz, sm = single["zero"].iloc[rank - 1], single["mean"].iloc[rank - 1]
        sa = single[cfg.ablation].iloc[rank - 1]
        ctl = summarize_control(float(sa.gap_reduction), np.delete(each_gr, l * n_heads + h))
        rows.append(
            {
                "rank": rank,
                "layer": l,
                "head": h,
                "attribution": float(a_all[l, h]),
                "patch_denoise": float(den.values[l, h]),
                "patch_noise": float(noi.effect[l, h]),
                "readout_patch_denoise": float(rd.values[l, h]),
                "readout_patch_noise": float(rn.effect[l, h]),
                "gap_reduction_mean": float(sm.gap_reduction),
                "gap_reduction_ci_low": float(sa.gap_reduction_ci_low),
                "gap_reduction_ci_high": float(sa.gap_reduction_ci_high),
                "gap_reduction_zero": float(sz.gap_reduction),
                "gap_reduction_ptrue_mean": float(sm.gap_reduction_ptrue),
                "d_acc_correct_mean": float(sm.d_acc_correct),
                "d_acc_correct_zero": float(sz.d_acc_correct),
                "d_acc_zero_shot_mean": float(sm.d_acc_zero_shot),
                "d_acc_zero_shot_zero": float(sz.d_acc_zero_shot),
                "fv_cie": float(fv_idx.loc[(l, h), "fv_cie"]),
                "control_ci_high": ctl["control_ci_high"],
                "control_p": ctl["control_p"],
                "n_other": ctl["n_draws"],
            }
        )
    return pd.DataFrame(rows)


def _all_heads(sc: _Screen, each_gr: np.ndarray, fv: pd.DataFrame, L: int, H: int) -> pd.DataFrame:
    """Every (layer, head): attribution, exact readout-slot patching, gap reduction alone, FV effect."""
    a_all, a_read = sc.attribution["head_out"].values, sc.attribution["head_out_readout"].values
    all_heads = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(L), H),
            "head": np.tile(np.arange(H), L),
            "attribution": a_all.reshape(-1).numpy(),
            "attribution_readout": a_read.reshape(-1).numpy(),
            "readout_patch_denoise": sc.readout_denoise.values.reshape(-1).numpy(),
            "readout_patch_noise": sc.readout_noise.effect.reshape(-1).numpy(),
            "gap_reduction": each_gr,
        }
    ).merge(fv, on=["layer", "head"])
    cands = set(sc.candidates)
    all_heads["candidate"] = [(int(l), int(h)) in cands for l, h in zip(all_heads["layer"], all_heads["head"])]
    return all_heads


def _agreement(sc: _Screen, den: PatchResult, L: int, H: int) -> dict[str, float]:
    """Attribution against exact patching: over all heads at the readout slot, over the candidates."""
    cand_est = torch.tensor([float(sc.attribution["head_out"].values[x]) for x in sc.candidates])
    cand_ex = torch.tensor([float(den.values[x]) for x in sc.candidates])
    agr = agreement(sc.attribution["head_out_readout"].values, sc.readout_denoise.values, k=min(10, L * H))
    agr_c = agreement(cand_est, cand_ex, k=min(5, len(sc.candidates))) if len(sc.candidates) > 2 else {}
    return {
        "spearman_readout": agr["spearman"],
        "topk_overlap_readout": agr["topk_overlap"],
        "k": agr["k"],
        "spearman_candidates": agr_c.get("spearman", float("nan")),
    }


def find_heads(
    model: Any,
    pair: PatchPair,
    held_out: AblationBatches,
    cfg: HeadFinderConfig | None = None,
    progress: bool = True,
    name: str | None = None,
) -> HeadFinderResult:
    """Find and validate the heads that carry in-context label information to the readout slot.

    ``pair`` (correct vs flipped labels) screens and confirms; ``held_out`` (other contexts) validates.
    ``name`` names the model in the result and its config (default: ``cfg.model``, else the bridge's model name).
    Cost: see ``HeadFinderConfig``.
    """
    cfg = cfg or HeadFinderConfig()
    name = name or cfg.model or str(getattr(model.cfg, "model_name", "model"))
    cfg = replace(cfg, model=name, task=pair.clean.task)  # the config records what ran, not defaults
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    timings: dict[str, float] = {}
    say: Callable[[str], None] = (lambda s: print(f"[mechicl] {s}", flush=True)) if progress else (lambda s: None)

    t = time.perf_counter()
    patcher = Patcher(model, pair, max_rows=max(16, cfg.max_rows // 4), progress=progress)
    sc = _screen(model, patcher, cfg)
    timings["screen"] = time.perf_counter() - t
    say(
        f"screened {L * H} heads (attribution + exact readout-slot patching) in {timings['screen']:.1f} s; "
        f"candidates {fmt_heads(sc.candidates)}"
    )

    t, f0 = time.perf_counter(), patcher.forwards  # confirm: exact patching at all positions, both directions
    den = patcher.sweep("head_out", "denoise", cells=sc.candidates)
    noi = patcher.sweep("head_out", "noise", cells=sc.candidates)
    timings["exact_patching"] = time.perf_counter() - t
    say(f"exact patching in {timings['exact_patching']:.1f} s ({patcher.forwards - f0:.1f} forward-equivalents)")
    ranked = sorted(sc.candidates, key=lambda x: -float(den.values[x]))

    t = time.perf_counter()  # validate: ablation on held-out contexts, controls
    abl = HeadAblator(model, held_out, max_rows=cfg.max_rows)
    single = {a: abl.gap_table([[h] for h in ranked], a, seed=cfg.seed) for a in ABLATIONS}
    # every head alone (flipped contexts only): the exact size-1 control, and each candidate's standing in it
    each = abl.gap_table([[(l, h)] for l in range(L) for h in range(H)], cfg.ablation, n_boot=0, with_correct=False)
    set_rows, controls = _set_controls(abl, ranked, single[cfg.ablation], each, cfg, progress)
    timings["ablation"] = time.perf_counter() - t
    t = time.perf_counter()
    fv = abl.function_vector_effects(progress=progress)
    timings["function_vectors"] = time.perf_counter() - t
    say(
        f"ablation + control in {timings['ablation']:.1f} s, function-vector effects in {timings['function_vectors']:.1f} s "
        f"(readout re-runs: {abl.correct.mode})"
    )

    each_gr = each["gap_reduction"].to_numpy()  # [L * H]
    return HeadFinderResult(
        config=cfg,
        model=cfg.model,
        task=cfg.task,
        heads=_candidate_rows(ranked, sc, den, noi, single, each_gr, fv, cfg, H),
        all_heads=_all_heads(sc, each_gr, fv, L, H),
        sets=pd.DataFrame(set_rows),
        control=pd.concat(controls, ignore_index=True) if controls else pd.DataFrame(),
        baseline=_baseline(abl),
        agreement=_agreement(sc, den, L, H),
        timings=timings,
        stepper_mode=abl.correct.mode,
    )
