"""Prior heads, selected and validated like label heads (issue 28): heads whose output carries the model's own
zero-shot answer.

**Support** of a head set for the zero-shot answer, per query (k = 0, the query alone): the zero-shot log-odds of
the model's own answer (its argmax over the label words against the most likely other word), minus the same
log-odds when the set's output at the readout slot is resample-ablated (another query's output; mean over
``n_resample`` derangements). Positive: the set pushes towards the answer the model gives without context (the
prior), whatever the true class.

Three disjoint draws of task rows (``data.batches.stage_draws``): every head is **screened** on the screening
queries (its support, one draw), the ``n_candidates`` strongest are **confirmed** on the confirmation queries
(kept when the CI of their support lies above 0, ranked by it) and the ``n_top`` best are **validated** on the
validation queries: their support with a CI, against ``n_control`` matched controls (same layer widened, nearest
output norm after the post-attention norm, ``heads.validation.matched_controls``), a paired difference (head minus
the mean of its controls, per query) with a bootstrap CI and a sign-flip p, and the four label-specific effects and
role of ``heads.roles`` on the validation contexts. A **prior head** is above its controls and has the role
"prior": it moves the zero-shot answer and carries no in-context label information. Pre-registered heads
(``heads=``) skip screening and confirmation.

CIs: 95% bootstrap over queries; each validation query is a distinct task row, so no design-effect widening.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from mechicl.analysis.engine.hooks import Head, fmt_heads, head_masks
from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.analysis.heads.ablation import HeadAblation, derangements
from mechicl.analysis.heads.roles import assign_roles, label_specific_effects
from mechicl.analysis.heads.validation import matched_controls
from mechicl.analysis.prior.moderation import log_odds
from mechicl.analysis.stats import mean_ci, sign_flip_p


@torch.no_grad()
def zero_shot_support(
    zs: ReadoutStepper, sets: Sequence[Sequence[Head]], *, n_resample: int = 2, seed: int = 0
) -> Float[np.ndarray, "set query"]:
    """Each set's support for the model's own zero-shot answer, per query (module docstring).

    Cost: ``n_resample`` one-token re-runs of every query per set (``ReadoutStepper.run``)."""
    answer = zs.base_logits.argmax(-1)  # [q]
    base = log_odds(zs.base_logits, answer)
    masks = head_masks(sets, zs.n_layers, zs.n_heads)
    runs = [log_odds(zs.run(masks, zs.z[d]), answer) for d in derangements(zs.n_contexts, n_resample, seed)]
    return base[None] - np.mean(runs, 0)


def screen_and_confirm(
    screen: ReadoutStepper,
    confirm: ReadoutStepper,
    *,
    n_candidates: int = 8,
    n_top: int = 3,
    n_resample: int = 2,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[pd.DataFrame, list[Head]]:
    """Every head's support on the screening queries; the ``n_candidates`` strongest re-measured on the confirmation
    queries; the top ``n_top`` whose CI lies above 0 (possibly none). Returns (the table, the selected heads)."""
    L, H = screen.n_layers, screen.n_heads
    heads = [(l, h) for l in range(L) for h in range(H)]
    s = zero_shot_support(screen, [[x] for x in heads], n_resample=n_resample, seed=seed).mean(-1)
    order = np.argsort(-s, kind="stable")[:n_candidates]
    cands = [heads[i] for i in order]
    c = zero_shot_support(confirm, [[x] for x in cands], n_resample=n_resample, seed=seed)
    m, lo, hi = mean_ci(c, n_boot=n_boot, seed=seed)
    tab = pd.DataFrame(
        {
            "heads": [fmt_heads([x]) for x in cands],
            "screen_support": s[order],
            "support": m,
            "ci_low": lo,
            "ci_high": hi,
        }
    )
    tab = tab.sort_values("support", ascending=False, kind="stable").reset_index(drop=True)
    keep = [cands[[fmt_heads([x]) for x in cands].index(n)] for n in tab.heads[tab.ci_low > 0]][:n_top]
    return tab, keep


def validate_prior_heads(
    model: Any,
    validate: ReadoutStepper,
    abl: HeadAblation,
    top: Sequence[Head],
    gap_ci_low: float,
    *,
    n_control: int = 5,
    control: str = "layer",
    n_resample: int = 2,
    n_boot: int = 2000,
    n_perm: int = 4000,
    seed: int = 0,
) -> pd.DataFrame:
    """Each head's support on the validation queries against its matched controls, and its label-specific effects
    and role on the validation contexts (``abl``), one row per head.

    Cost: ``n_resample`` zero-shot re-runs per head and control, and ``heads.roles.label_specific_effects``."""
    top = list(top)
    norms = abl.head_norms(model)
    ctrl = {x: matched_controls(x, norms, set(top), control, n_control) for x in top}
    singles = list(dict.fromkeys(top + [c for x in top for c in ctrl[x]]))
    sup = dict(zip(singles, zero_shot_support(validate, [[x] for x in singles], n_resample=n_resample, seed=seed)))
    rows = []
    for x in top:
        d = sup[x] - np.mean([sup[c] for c in ctrl[x]], 0)
        m, lo, hi = mean_ci(sup[x], n_boot=n_boot, seed=seed)
        dm, dlo, dhi = mean_ci(d, n_boot=n_boot, seed=seed)
        rows.append(
            {
                "heads": fmt_heads([x]),
                "support": float(m),
                "support_ci_low": float(lo),
                "support_ci_high": float(hi),
                "controls": fmt_heads(ctrl[x]),
                "control_support": float(np.mean([sup[c].mean() for c in ctrl[x]])),
                "diff": float(dm),
                "diff_ci_low": float(dlo),
                "diff_ci_high": float(dhi),
                "p": float(sign_flip_p(d, n_perm=n_perm, seed=seed)),
                "above_control": bool(lo > 0 and dlo > 0),
                "norm": float(norms[x]),
                "control_norm": float(np.mean([norms[c] for c in ctrl[x]])),
            }
        )
    eff = assign_roles(label_specific_effects(abl, validate, [[x] for x in top], n_boot=n_boot, seed=seed), gap_ci_low)
    out = pd.DataFrame(rows).merge(eff, on="heads")
    out["prior_head"] = out.above_control & (out.role == "prior")
    return out
