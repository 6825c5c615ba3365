"""Head-level findings for one (model, task, seed) cell: screen -> confirm -> validate on disjoint draws.

1. **Is there anything to explain?** On the validation draws: the correct-vs-flipped gap in
   P(true) (mean over slots ``k >= k_min``) must have a CI above 0; otherwise the cell's verdict is
   "no in-context effect to attribute" and no head is ranked. Whether default labels beat k = 0
   (P(true) at the last slot against the same query alone, ``icl_gain``) is reported beside it but
   does not gate: a model whose prior is already right can still be moved by flipped labels, and
   that movement is the in-context label information the heads are asked to explain.
2. **Screen** (screening draws): every head ablated alone (one resample draw), beside a first-order
   estimate (attribution of the same ablation; one backward per condition). ``screen="attribution"``
   ranks by the estimate alone (cheap, but it misses saturated heads: on the strong organism it gave
   L0H0 -0.15 where its exact effect was +0.56). The top ``n_candidates`` go on.
3. **Confirm** (confirmation draws): exact resample ablation of each candidate; ranked by effect.
4. **Validate** (validation draws): the top ``n_top`` heads' effects with CIs, each against
   ``n_control`` matched control heads (same layer, widened to neighbouring layers until there are
   enough, nearest in output norm after the model's post-attention norm; or nearest in that norm
   anywhere; ``controls_other_layer`` counts those from another layer), the set tests and the top set
   against matched sets. Decision rule: a head is **above control** when the CI of (its effect - the
   mean effect of its controls), paired over contexts, lies above 0 and the CI of its own effect lies
   above 0.
5. **Roles** (validation draws): each top head's and the top set's effect under interchange, under
   condition-matched ablation in correct and flipped contexts, and at zero shot, each with a CI, and
   the role they imply (label, label+prior, prior, class, generic: ``analysis.heads.roles``).

Effects are shares of the correct-vs-flipped gap closed by ablation (``analysis.heads.ablation``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mechicl.analysis.engine.hooks import Head, fmt_heads
from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.analysis.heads.ablation import HeadAblation, p_true
from mechicl.analysis.heads.config import FindingsConfig, check_head_pool
from mechicl.analysis.heads.validation import validate_top
from mechicl.analysis.stats import mean_ci, shared_row_design_effect
from mechicl.data.batches import HeldOutBatches
from mechicl.errors import ConfigError
from mechicl.models.device import release_host_memory

NO_EFFECT = "no in-context effect to attribute"


@dataclass(frozen=True)
class FindingsResult:
    """One cell's tables (see ``docs/outputs.md``, ``findings``).

    ``baseline``: the cell-level checks (gap and ICL gain with CIs). ``screen``: every head's
    first-order effect. ``confirm``: the candidates' exact effects. ``validate``: the top heads with
    effects, CIs, controls and verdicts. ``sets``: the set tests. ``controls``: every control head.
    """

    config: FindingsConfig
    verdict: str
    baseline: dict[str, float]
    screen: pd.DataFrame = field(repr=False)
    confirm: pd.DataFrame = field(repr=False)
    validate: pd.DataFrame = field(repr=False)
    sets: pd.DataFrame = field(repr=False)
    controls: pd.DataFrame = field(repr=False)
    stage_seeds: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def has_effect(self) -> bool:
        return self.verdict != NO_EFFECT


def _baseline(abl: HeadAblation, zero_shot: ReadoutStepper, cfg: FindingsConfig) -> dict[str, float]:
    """The cell-level checks on the validation draws."""
    gap, g_lo, g_hi = mean_ci(abl.gap, n_boot=cfg.n_boot, seed=cfg.seed, items=abl.items)
    p0 = p_true(zero_shot.base_logits, zero_shot.batch.true_labels[:, -1]).numpy()
    gain, i_lo, i_hi = mean_ci(abl.base["correct"][:, -1] - p0, n_boot=cfg.n_boot, seed=cfg.seed, items=abl.items)
    return {
        "gap": float(gap),
        "gap_ci_low": float(g_lo),
        "gap_ci_high": float(g_hi),
        "icl_gain": float(gain),
        "icl_gain_ci_low": float(i_lo),
        "icl_gain_ci_high": float(i_hi),
        "p_correct": float(abl.base["correct"].mean()),
        "p_flipped": float(abl.base["flipped"].mean()),
        "p_zero_shot": float(p0.mean()),
        "acc_correct_last": float(abl.acc_last["correct"].mean()),
        "acc_flipped_last": float(abl.acc_last["flipped"].mean()),
        "n_contexts": abl.n_contexts,
        "n_slots": int(abl.labels.shape[1]),
        "design_effect": shared_row_design_effect(abl.items),
    }


def _screen(abl: HeadAblation, cfg: FindingsConfig, progress: bool) -> pd.DataFrame:
    """Every head alone on the screening draws: the first-order estimate (``effect_est``) and, with
    ``screen="exact"``, the exact effect of one resample draw (``effect``); ranked by ``cfg.screen``'s.

    Ranks use the un-normalised gap closed (``closed``, ``closed_est``: mean ΔP(true) over contexts),
    so a screening draw whose own correct-vs-flipped gap is not positive (possible with 8 contexts
    when the validation gap is small) still ranks the heads; its ``effect`` columns are then NaN.
    """
    est = abl.attribution()  # [b, L, H]: per-context closed estimate
    gap = abl.gap.mean()
    L, H = est.shape[1:]
    share = (lambda x: x / gap) if gap > 0 else (lambda x: np.full_like(x, np.nan))  # noqa: E731
    closed_est = est.mean(0).reshape(-1)
    df = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(L), H),
            "head": np.tile(np.arange(H), L),
            "effect_est": share(closed_est),
            "closed_est": closed_est,
        }
    )
    key = "closed_est"
    if cfg.screen == "exact":
        sc = abl.scores([[(l, h)] for l in range(L) for h in range(H)], progress=progress)
        df["closed"] = sc.closed.mean(-1)
        df["effect"] = share(df["closed"].to_numpy())
        key = "closed"
    df["screen_rank"] = df[key].rank(ascending=False, method="first").astype(int)
    return df.sort_values("screen_rank").reset_index(drop=True)


def _confirm(abl: HeadAblation, candidates: list[Head], cfg: FindingsConfig, progress: bool) -> pd.DataFrame:
    """Exact effects of the candidates on the confirmation draws, ranked."""
    t = abl.table(abl.scores([[x] for x in candidates], progress=progress), cfg.n_boot, cfg.seed)
    t.insert(0, "layer", [l for l, _ in candidates])
    t.insert(1, "head", [h for _, h in candidates])
    t = t.sort_values("effect", ascending=False, kind="stable").reset_index(drop=True)
    t.insert(0, "rank", np.arange(1, len(t) + 1))
    return t


def find_label_heads(
    model: Any,
    batches: HeldOutBatches,
    cfg: FindingsConfig | None = None,
    progress: bool = True,
    spill: Path | None = None,
) -> FindingsResult:
    """Screen, confirm and validate label-aggregation heads on the three disjoint draws of ``batches``.

    Cost: 2 forwards of each stage's contexts and 1 of the validation queries alone; 2 backwards of
    S slots per screening context; ``2 x n_resample x S`` one-token steps per context for each
    candidate (confirmation) and each validated set (top heads, controls, set tests); memory: the
    KV caches of the validation draw and of the stage running (both conditions), or with ``spill`` (a
    scratch folder, ``HeadAblation``) a slice of one condition's cache of one draw at a time.
    """
    cfg = cfg or FindingsConfig()
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    check_head_pool(cfg, L, H)
    bad = [fmt_heads([x]) for x in cfg.preregistered if not (0 <= x[0] < L and 0 <= x[1] < H)]
    if bad:
        raise ConfigError(f"pre-registered heads {bad} are not in this model ({L} layers x {H} heads)")
    if set(batches.stages) != set(cfg.sizes):
        raise ValueError(f"the batches hold stages {sorted(batches.stages)}, the config needs {sorted(cfg.sizes)}")
    if batches.draws.shared_examples():
        raise ValueError("held-out stages share task rows: build them with data.batches.stage_draws")
    say = (lambda s: print(f"[mechicl] {s}", flush=True)) if progress else (lambda s: None)
    timings, t = {}, time.perf_counter()
    kw = dict(k_min=cfg.k_min, mode=cfg.ablation, n_resample=cfg.n_resample, seed=cfg.seed, spill=spill)
    val = HeadAblation(model, *batches.stages["validate"], **kw)
    zs = ReadoutStepper(model, batches.zero_shot)
    base = _baseline(val, zs, cfg)
    timings["baseline"] = time.perf_counter() - t
    empty = pd.DataFrame()
    if not base["gap_ci_low"] > 0:
        say(
            f"{NO_EFFECT}: gap {base['gap']:+.3f} [{base['gap_ci_low']:+.3f}, {base['gap_ci_high']:+.3f}], "
            f"ICL gain {base['icl_gain']:+.3f} [{base['icl_gain_ci_low']:+.3f}, {base['icl_gain_ci_high']:+.3f}]"
        )
        return FindingsResult(cfg, NO_EFFECT, base, empty, empty, empty, empty, empty, batches.draws.seeds, timings)
    if cfg.preregistered:  # validated as given: no screening or confirmation
        screen, confirm, top = empty, empty, list(cfg.preregistered)
        which = f"the {len(top)} pre-registered heads"
    else:
        screen, confirm = _discover(model, batches, cfg, kw, timings, progress)
        top = list(zip(confirm.layer.head(cfg.n_top).astype(int), confirm["head"].head(cfg.n_top).astype(int)))
        which = f"the top {len(top)} heads"
    t = time.perf_counter()
    validate, sets, controls = validate_top(model, val, zs, top, cfg, base["gap_ci_low"], progress)
    timings["validate"] = time.perf_counter() - t
    verdict = _verdict_text(validate, which)
    say(f"{verdict} ({sum(timings.values()):.0f} s)")
    return FindingsResult(cfg, verdict, base, screen, confirm, validate, sets, controls, batches.draws.seeds, timings)


def _discover(
    model: Any, batches: HeldOutBatches, cfg: FindingsConfig, kw: dict, timings: dict[str, float], progress: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Screen every head on the screening draw, then confirm the best ``n_candidates`` on the confirmation draw."""
    t = time.perf_counter()
    screen = _screen(HeadAblation(model, *batches.stages["screen"], **{**kw, "n_resample": 1}), cfg, progress)
    release_host_memory()  # the screening steppers' caches: back to the OS before the next stage's
    timings["screen"] = time.perf_counter() - t
    t = time.perf_counter()
    cands = list(
        zip(screen.layer.head(cfg.n_candidates).astype(int), screen["head"].head(cfg.n_candidates).astype(int))
    )
    confirm = _confirm(HeadAblation(model, *batches.stages["confirm"], **kw), cands, cfg, progress)
    release_host_memory()
    timings["confirm"] = time.perf_counter() - t
    return screen, confirm


def _verdict_text(validate: pd.DataFrame, which: str) -> str:
    above = validate[validate.above_control]
    names = ", ".join(f"{h} ({r})" for h, r in zip(above.heads, above.role))
    return f"{len(above)} of {which} above matched controls: {names or 'none'}"
