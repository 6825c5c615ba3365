"""Validation of a cell's top heads on the held-out validation draw: matched controls, the paired head-vs-controls
test, the set tests, and each head's label-specific effects and role (``analysis.heads.roles``).

Controls: ``n_control`` heads per validated head, from its own layer widened to neighbouring layers until there are
enough (``control="layer"``), or anywhere (``"norm"``), nearest in output norm measured after the model's
post-attention norm (``HeadAblation.head_norms``); ``controls_other_layer`` counts those from another layer.
Cost: ``2 x S`` one-token steps per context for each validated set (top heads, controls, set tests), twice more
per top head and the top set for the roles, and the zero-shot checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from mechicl.analysis.engine.hooks import Head, fmt_heads
from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.analysis.heads.ablation import HeadAblation
from mechicl.analysis.heads.config import FindingsConfig
from mechicl.analysis.heads.roles import assign_roles, label_specific_effects
from mechicl.analysis.stats import ratio_ci, sign_flip_p


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


def _paired(abl: HeadAblation, d: np.ndarray, cfg: FindingsConfig) -> dict[str, float]:
    """A per-context difference of closed gaps as a share of the gap: estimate, CI, sign-flip p."""
    est, lo, hi = ratio_ci(d, abl.gap, n_boot=cfg.n_boot, seed=cfg.seed, items=abl.items)
    p = sign_flip_p(d, n_perm=cfg.n_perm, seed=cfg.seed)
    return {"diff": float(est), "diff_ci_low": float(lo), "diff_ci_high": float(hi), "p": float(p)}


def validate_top(
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
