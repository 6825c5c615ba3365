"""Paired statistics over context draws: bootstrap CIs, sign-flip p-values, verdicts.

Conditions are scored on the same context draws, so a comparison at one k is
a vector of per-context differences d_i = metric_a(i) - metric_b(i). We report
its mean, a percentile-bootstrap CI and a sign-flip permutation p-value, and
correct across the k tested with Holm's method.

A comparison that does not reject is only called "no effect" when its CI sits
inside +-min_effect (an equivalence margin; for one-sided tests too); otherwise it says
"not enough draws to decide". Proportions (accuracy) get Wilson intervals (``wilson_interval``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float
from scipy import stats as sps

NOT_ENOUGH = "not enough draws to decide"


def t_interval(x: Float[np.ndarray, "n"], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval of ``x`` (one value per context); a single value is its own interval."""
    x = np.asarray(x, dtype=float)
    m = float(np.mean(x))
    if len(x) < 2:
        return m, m, m
    half = float(t_half_width(np.std(x, ddof=1), len(x), level))
    return m, m - half, m + half


def t_half_width(std: Any, n: Any, level: float = 0.95) -> Any:
    """Half-width of the Student-t interval of a mean: ``t_{(1+level)/2, n-1} * std / sqrt(n)`` (vectorised)."""
    return sps.t.ppf(0.5 + level / 2, np.maximum(n - 1, 1)) * std / np.sqrt(n)


def wilson_interval(successes: Any, n: Any, level: float = 0.95) -> tuple[Any, Any]:
    """Wilson score interval of a proportion ``successes / n`` (vectorised); inside [0, 1] by construction."""
    n = np.asarray(n, dtype=float)
    p = np.asarray(successes, dtype=float) / np.maximum(n, 1)
    z = sps.norm.ppf(0.5 + level / 2)
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


@dataclass(frozen=True)
class PairedResult:
    """Mean paired difference with a bootstrap CI and a permutation p-value. Cost: O(n_boot * n)."""

    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int


def paired_test(
    a: Float[np.ndarray, "n"],
    b: Float[np.ndarray, "n"],
    *,
    alternative: str = "two-sided",
    level: float = 0.95,
    n_boot: int = 4000,
    seed: int = 0,
) -> PairedResult:
    """Test mean(a - b) = 0 against ``alternative`` ('two-sided', 'greater': a > b, 'less').

    The p-value comes from random sign flips of the differences (exact under the
    null that each difference is symmetric about 0); the CI from resampling contexts.
    """
    if alternative not in {"two-sided", "greater", "less"}:
        raise ValueError(f"alternative must be two-sided, greater or less, not {alternative!r}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"need at least two paired values, got shape {d.shape}")
    n, mean = len(d), float(d.mean())
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, n, size=(n_boot, n))].mean(1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    signs = rng.choice([-1.0, 1.0], size=(n_boot, n))
    null = (signs * d).mean(1)
    if alternative == "greater":
        p = (1 + np.sum(null >= mean)) / (n_boot + 1)
    elif alternative == "less":
        p = (1 + np.sum(null <= mean)) / (n_boot + 1)
    else:
        p = (1 + np.sum(np.abs(null) >= abs(mean))) / (n_boot + 1)
    return PairedResult(mean, float(lo), float(hi), float(p), n)


def holm(p: Float[np.ndarray, "m"]) -> Float[np.ndarray, "m"]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone)."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p)
    adj = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adj[i] = running
    return adj


def decide(result: PairedResult, p_adj: float, alpha: float, min_effect: float, alternative: str) -> str:
    """'reject', 'no effect (within +-min_effect)' or NOT_ENOUGH.

    "No effect" needs the whole CI inside (-min_effect, +min_effect) for one-sided tests too: a CI
    such as [-0.2, +0.09] rules out a rise of 0.1 but not a fall of 0.2, so it cannot be "within ±0.1".
    ``alternative`` only shapes the p-value.
    """
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
