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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mechicl.analysis.engine.hooks import Head, fmt_heads
from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.analysis.heads.ablation import MODES, HeadAblation, p_true
from mechicl.analysis.heads.modes import FINDINGS_DEFAULT
from mechicl.analysis.heads.roles import assign_roles, label_specific_effects
from mechicl.analysis.stats import check_draws, mean_ci, ratio_ci, shared_row_design_effect, sign_flip_p
from mechicl.data.batches import HeldOutBatches
from mechicl.data.names import parse_heads
from mechicl.errors import ConfigError
from mechicl.models.device import release_host_memory

NO_EFFECT = "no in-context effect to attribute"


@dataclass(frozen=True)
class FindingsConfig:
    """One cell of the findings grid. Cost on Gemma-3-270M: see ``docs/findings.md`` (measured)."""

    k: int = 16  # demonstrations before the last query: contexts hold k + 1 examples
    k_min: int = 8  # the first readout slot measured (slots k_min..k)
    n_screen: int = 8
    n_confirm: int = 24
    n_validate: int = 32
    n_candidates: int = 8
    screen: str = "exact"  # "exact": every head ablated (one resample draw); "attribution": first-order only
    n_top: int = 3
    ablation: str = FINDINGS_DEFAULT  # interchange (analysis.heads.modes): chosen by the ground-truth benchmark
    n_resample: int = 2
    control: str = "layer"  # "layer": same layer (widened), nearest in output norm; "norm": nearest in norm
    n_control: int = 5
    n_boot: int = 2000
    n_perm: int = 4000
    seed: int = 0
    heads: str = ""  # pre-registered heads ("L10H3 L11H2"): validated as given, no screening or confirmation
    fresh_after: str = ""  # seeds ("0 1 2") whose rows (three-stage draws, these sizes) no pool may hold

    def __post_init__(self) -> None:
        check_draws(self.n_boot)  # degenerate draw counts fail here, before any compute (issue 30)
        check_draws(self.n_perm, "n_perm")
        if not 0 <= self.k_min <= self.k:
            raise ConfigError(f"need 0 <= k_min <= k, got k_min={self.k_min}, k={self.k}")
        if min(self.n_screen, self.n_confirm, self.n_validate) < 4:
            raise ConfigError("each stage needs at least 4 contexts (resampling and intervals)")
        if self.ablation not in MODES:
            raise ConfigError(f"ablation must be one of {tuple(MODES)}, got {self.ablation!r}")
        if self.screen not in ("exact", "attribution"):
            raise ConfigError(f"screen must be 'exact' or 'attribution', got {self.screen!r}")
        if self.control not in ("layer", "norm"):
            raise ConfigError(f"control must be 'layer' or 'norm', got {self.control!r}")
        if self.n_top < 1 or self.n_candidates < self.n_top or self.n_control < 1:
            raise ConfigError("need 1 <= n_top <= n_candidates and n_control >= 1")
        if self.preregistered and len(set(self.preregistered)) != len(self.preregistered):
            raise ConfigError(f"heads lists a head twice ({self.heads!r}); list each once")
        self.excluded_seeds  # noqa: B018 - parsed here so a bad value fails before any compute

    @property
    def preregistered(self) -> tuple[Head, ...]:
        """The pre-registered heads (``heads`` parsed), in the order given; () = discover them."""
        return parse_heads(self.heads)

    @property
    def excluded_seeds(self) -> tuple[int, ...]:
        try:
            seeds = tuple(int(x) for x in self.fresh_after.replace(",", " ").split())
        except ValueError:
            raise ConfigError(f"fresh_after must list seeds, e.g. '0 1 2'; got {self.fresh_after!r}") from None
        if any(x < 0 for x in seeds):
            raise ConfigError(f"fresh_after must list seeds >= 0, got {self.fresh_after!r}")
        return seeds

    @property
    def discovery_sizes(self) -> dict[str, int]:
        return {"screen": self.n_screen, "confirm": self.n_confirm, "validate": self.n_validate}

    @property
    def sizes(self) -> dict[str, int]:
        """The stages drawn: all three, or the validation draw alone for pre-registered heads."""
        return {"validate": self.n_validate} if self.preregistered else self.discovery_sizes


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


def matched_controls(head: Head, norms: np.ndarray, exclude: set[Head], how: str, n: int) -> list[Head]:
    """``n`` control heads for ``head``: same layer, widened one layer at a time until ``n`` heads
    are available, the nearest in output norm among them (``how="layer"``); or the ``n`` nearest in
    log output norm anywhere (``"norm"``)."""
    L, H = norms.shape
    pool = [(l, h) for l in range(L) for h in range(H) if (l, h) != head and (l, h) not in exclude]
    if how == "layer":
        for w in range(L):
            near = [x for x in pool if abs(x[0] - head[0]) <= w]
            if len(near) >= n or len(near) == len(pool):
                pool = near
                break
    dist = [abs(np.log(norms[x] + 1e-12) - np.log(norms[head] + 1e-12)) for x in pool]
    return [pool[i] for i in np.argsort(dist, kind="stable")[:n]]


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


def _paired(abl: HeadAblation, d: np.ndarray, cfg: FindingsConfig) -> dict[str, float]:
    """A per-context difference of closed gaps as a share of the gap: estimate, CI, sign-flip p."""
    est, lo, hi = ratio_ci(d, abl.gap, n_boot=cfg.n_boot, seed=cfg.seed, items=abl.items)
    p = sign_flip_p(d, n_perm=cfg.n_perm, seed=cfg.seed)
    return {"diff": float(est), "diff_ci_low": float(lo), "diff_ci_high": float(hi), "p": float(p)}


def _validate(
    model: Any,
    abl: HeadAblation,
    zs: ReadoutStepper,
    top: list[Head],
    cfg: FindingsConfig,
    gap_ci_low: float,
    progress: bool,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Top heads against matched controls, the set tests, and each head's and the top set's label-specific effects
    and role (validation draws)."""
    norms = abl.head_norms(model)
    ctrl = {x: matched_controls(x, norms, set(top), cfg.control, cfg.n_control) for x in top}
    singles = list(dict.fromkeys(top + [c for x in top for c in ctrl[x]]))
    sets: list[list[Head]] = [[x] for x in singles]
    if len(top) >= 2:  # {top1 + x} for x = top2 and top2's controls; the top set and matched sets
        sets += [sorted([top[0], x]) for x in [top[1], *ctrl[top[1]]]]
        sets += [sorted(top)] + [sorted(ctrl[x][i] for x in top) for i in range(cfg.n_control)]
    sets = list({fmt_heads(sorted(x)): sorted(x) for x in sets}.values())  # e.g. {top1, top2} is also the top set
    sc = abl.scores(sets, progress=progress)
    row = {name: i for i, name in enumerate(sc.names)}
    closed = lambda hs: sc.closed[row[fmt_heads(sorted(hs))]]  # noqa: E731
    tab = abl.table(sc, cfg.n_boot, cfg.seed).set_index("heads")
    rows = []
    for rank, x in enumerate(top, 1):
        c_eff = tab.loc[[fmt_heads([c]) for c in ctrl[x]], "effect"].to_numpy()
        d = closed([x]) - np.mean([closed([c]) for c in ctrl[x]], 0)
        r = {
            "rank": rank,
            "layer": x[0],
            "head": x[1],
            "heads": fmt_heads([x]),
            **tab.loc[fmt_heads([x])].to_dict(),
            "norm": norms[x],
            "controls": fmt_heads(ctrl[x]),
            "controls_other_layer": sum(c[0] != x[0] for c in ctrl[x]),
            "control_norm": float(np.mean([norms[c] for c in ctrl[x]])),
            "control_mean": float(c_eff.mean()),
            "control_min": float(c_eff.min()),
            "control_max": float(c_eff.max()),
            "control_rank_p": float((1 + (c_eff >= tab.loc[fmt_heads([x]), "effect"]).sum()) / (1 + len(c_eff))),
            **_paired(abl, d, cfg),
        }
        r["above_control"] = bool(r["diff_ci_low"] > 0 and r["effect_ci_low"] > 0)
        rows.append(r)
    roles = _roles(abl, zs, top, cfg, gap_ci_low)
    val = pd.DataFrame(rows).merge(roles, on="heads")
    controls = tab.loc[[fmt_heads([c]) for c in singles if c not in top]].reset_index()
    sets_tab = _set_tests(abl, tab, closed, top, ctrl, cfg)
    if len(sets_tab):
        sets_tab = sets_tab.merge(roles, on="heads", how="left")
    return val, sets_tab, controls


def _roles(abl: HeadAblation, zs: ReadoutStepper, top: list[Head], cfg: FindingsConfig, gap_low: float) -> pd.DataFrame:
    """The four label-specific effects and the role of each top head and of the top set (``analysis.heads.roles``)."""
    sets = [[x] for x in top] + ([sorted(top)] if len(top) >= 2 else [])
    eff = label_specific_effects(abl, zs, sets, n_boot=cfg.n_boot, seed=cfg.seed)
    return assign_roles(eff, gap_low)


def _set_tests(
    abl: HeadAblation,
    tab: pd.DataFrame,
    closed: Callable[[list[Head]], np.ndarray],
    top: list[Head],
    ctrl: dict[Head, list[Head]],
    cfg: FindingsConfig,
) -> pd.DataFrame:
    """{top1 + top2} vs {top1} against {top1 + control of top2} vs {top1}; the top set against matched sets."""
    if len(top) < 2:
        return pd.DataFrame()
    t1, t2 = top[0], top[1]
    inc = lambda x: closed([t1, x]) - closed([t1])  # noqa: E731 - per-context increment over top1 alone
    rows = []
    d = inc(t2) - np.mean([inc(c) for c in ctrl[t2]], 0)
    r_inc = ratio_ci(inc(t2), abl.gap, n_boot=cfg.n_boot, seed=cfg.seed, items=abl.items)
    rows.append(
        {
            "test": f"{fmt_heads([t1, t2])} vs {fmt_heads([t1])}",
            "heads": fmt_heads(sorted([t1, t2])),
            "effect": float(r_inc[0]),
            "effect_ci_low": float(r_inc[1]),
            "effect_ci_high": float(r_inc[2]),
            "controls": "; ".join(fmt_heads(sorted([t1, c])) for c in ctrl[t2]),
            "control_mean": float(np.mean([inc(c).mean() for c in ctrl[t2]]) / abl.gap.mean()),
            **_paired(abl, d, cfg),
        }
    )
    matched = [sorted(ctrl[x][i] for x in top) for i in range(cfg.n_control)]
    d = closed(sorted(top)) - np.mean([closed(m) for m in matched], 0)
    t = tab.loc[fmt_heads(sorted(top))]
    rows.append(
        {
            "test": f"top {len(top)} set vs matched sets",
            "heads": fmt_heads(sorted(top)),
            "effect": float(t.effect),
            "effect_ci_low": float(t.effect_ci_low),
            "effect_ci_high": float(t.effect_ci_high),
            "gap_reduction": float(t.gap_reduction),
            "controls": "; ".join(fmt_heads(m) for m in matched),
            "control_mean": float(tab.loc[[fmt_heads(m) for m in matched], "effect"].mean()),
            "control_gap_reduction": float(tab.loc[[fmt_heads(m) for m in matched], "gap_reduction"].mean()),
            **_paired(abl, d, cfg),
        }
    )
    out = pd.DataFrame(rows)
    out["above_control"] = (out["diff_ci_low"] > 0) & (out["effect_ci_low"] > 0)
    return out


def check_head_pool(cfg: FindingsConfig, n_layers: int, n_heads: int) -> None:
    """Before any compute: each of the ``n_top`` validated heads needs ``n_control`` matched controls among the
    model's other heads that are not validated themselves, so ``n_top + n_control`` may not exceed its heads."""
    total = n_layers * n_heads
    n_top = len(cfg.preregistered) or cfg.n_top
    if n_top + cfg.n_control > total:
        raise ConfigError(
            f"the model has {total} heads ({n_layers} layers x {n_heads}): too few to validate {n_top} heads "
            f"against {cfg.n_control} matched controls each; lower n_top / n_control (--n-top, --n-control) so that "
            f"n_top + n_control <= {total}"
        )


def find_label_heads(
    model: Any, batches: HeldOutBatches, cfg: FindingsConfig | None = None, progress: bool = True
) -> FindingsResult:
    """Screen, confirm and validate label-aggregation heads on the three disjoint draws of ``batches``.

    Cost: 2 forwards of each stage's contexts and 1 of the validation queries alone; 2 backwards of
    S slots per screening context; ``2 x n_resample x S`` one-token steps per context for each
    candidate (confirmation) and each validated set (top heads, controls, set tests); memory: the
    KV caches of one stage's contexts.
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
    kw = dict(k_min=cfg.k_min, mode=cfg.ablation, n_resample=cfg.n_resample, seed=cfg.seed)
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
    if cfg.preregistered:
        return _validate_preregistered(model, val, zs, base, cfg, batches, timings, say, progress)
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
    t = time.perf_counter()
    top = list(zip(confirm.layer.head(cfg.n_top).astype(int), confirm["head"].head(cfg.n_top).astype(int)))
    validate, sets, controls = _validate(model, val, zs, top, cfg, base["gap_ci_low"], progress)
    timings["validate"] = time.perf_counter() - t
    verdict = _verdict_text(validate, f"the top {len(top)} heads")
    say(f"{verdict} ({sum(timings.values()):.0f} s)")
    return FindingsResult(cfg, verdict, base, screen, confirm, validate, sets, controls, batches.draws.seeds, timings)


def _verdict_text(validate: pd.DataFrame, which: str) -> str:
    above = validate[validate.above_control]
    names = ", ".join(f"{h} ({r})" for h, r in zip(above.heads, above.role))
    return f"{len(above)} of {which} above matched controls: {names or 'none'}"


def _validate_preregistered(
    model: Any,
    val: HeadAblation,
    zs: ReadoutStepper,
    base: dict,
    cfg: FindingsConfig,
    batches: HeldOutBatches,
    timings: dict[str, float],
    say: Callable[[str], None],
    progress: bool,
) -> FindingsResult:
    """Pre-registered heads: validated as given on the validation draw (no screening or confirmation)."""
    t = time.perf_counter()
    top = list(cfg.preregistered)
    validate, sets, controls = _validate(model, val, zs, top, cfg, base["gap_ci_low"], progress)
    timings["validate"] = time.perf_counter() - t
    verdict = _verdict_text(validate, f"the {len(top)} pre-registered heads")
    say(f"{verdict} ({sum(timings.values()):.0f} s)")
    empty = pd.DataFrame()
    return FindingsResult(cfg, verdict, base, empty, empty, validate, sets, controls, batches.draws.seeds, timings)
