"""From paired tests to verdicts: reject, "no effect" within an equivalence margin, or not enough draws.

A comparison that does not reject is only called "no effect" when its CI sits inside +-min_effect (an
equivalence margin; for one-sided tests too); otherwise it says "not enough draws to decide".
``compare_over_k`` runs the paired test at each k of a per-context table and corrects over the k with Holm.
Cost: one ``paired_test`` (``n_boot x n`` twice) per k.
"""

from __future__ import annotations

import pandas as pd

from mechicl.analysis.stats.equivalence import check_margin
from mechicl.analysis.stats.tests import PairedResult, holm, paired_test

NOT_ENOUGH = "not enough draws to decide"


def decide(result: PairedResult, p_adj: float, alpha: float, min_effect: float, alternative: str) -> str:
    """'reject', 'no effect (within +-min_effect)' or NOT_ENOUGH.

    "No effect" needs the whole CI inside (-min_effect, +min_effect) for one-sided tests too: a CI
    such as [-0.2, +0.09] rules out a rise of 0.1 but not a fall of 0.2, so it cannot be "within ±0.1".
    ``alternative`` only shapes the p-value. ``min_effect`` must be finite and > 0 (``check_margin``).
    """
    min_effect = check_margin(min_effect, "min_effect")
    if p_adj < alpha:
        return "reject"
    inside = -min_effect < result.ci_low and result.ci_high < min_effect
    return f"no effect (within ±{min_effect:g})" if inside else NOT_ENOUGH


def compare_over_k(
    raw: pd.DataFrame,
    a: tuple[str, str],
    b: tuple[str, str],
    ks: list[int],
    *,
    alternative: str = "greater",
    alpha: float = 0.05,
    min_effect: float = 0.1,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired test of (condition, metric) ``a`` against ``b`` at each k; Holm-corrected over ``ks``.

    ``raw`` is the per-context table from ``behavior.run_behavior`` (condition, context, k, metric, value).
    """
    wide = raw.pivot_table(index=["context", "k"], columns=["condition", "metric"], values="value")
    for cond, metric in (a, b):
        if (cond, metric) not in wide.columns:
            have = sorted({f"{c}/{m}" for c, m in wide.columns})
            raise KeyError(f"no results for condition {cond!r} metric {metric!r}; have {have}")
    rows = []
    for k in ks:
        sub = wide.xs(k, level="k")
        r = paired_test(sub[a].to_numpy(), sub[b].to_numpy(), alternative=alternative, seed=seed + k)
        rows.append(
            {"k": k, "mean_diff": r.mean, "ci_low": r.ci_low, "ci_high": r.ci_high, "p_value": r.p_value, "n": r.n}
        )
    out = pd.DataFrame(rows)
    out["p_holm"] = holm(out.p_value.to_numpy())
    out["decision"] = [
        decide(PairedResult(m, lo, hi, p, n), ph, alpha, min_effect, alternative)
        for m, lo, hi, p, n, ph in zip(out.mean_diff, out.ci_low, out.ci_high, out.p_value, out.n, out.p_holm)
    ]
    out.insert(0, "a", f"{a[0]}/{a[1]}")
    out.insert(1, "b", f"{b[0]}/{b[1]}")
    out.insert(2, "alternative", alternative)
    return out
