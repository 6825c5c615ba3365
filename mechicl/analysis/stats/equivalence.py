"""Equivalence margins sized by a measured effect, and the two one-sided tests (TOST) for a paired mean.

"No effect" is only as strong as its margin. A fixed margin (say +-0.1 nats) can be a third of the
largest effect the experiment can show; here the margin is a stated *fraction* of a reference
difference measured on the same draws (e.g. default-label minus flipped-label log-likelihood at the
same k, the whole range a label-order effect could move). To keep the margin from being inflated by
noise in the reference, it is the fraction times the reference's *lower* 95% bootstrap bound: with 97.5%
confidence the margin is at most that fraction of the true reference effect.

A difference is then "equivalent to 0" when its CI lies inside +-margin (``decisions.decide``); ``tost``
gives the matching t-based p-value (Schuirmann's two one-sided tests), reported beside it. A margin must be
finite and positive (``check_margin``): +-inf would call anything "no effect".
Cost: one paired bootstrap (``n_boot x n``) per reference and k.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float
from scipy import stats as sps

from mechicl.analysis.stats.tests import paired_test
from mechicl.errors import ConfigError


def check_margin(margin: float, name: str = "margin") -> float:
    """``margin`` if it is a finite number > 0, else a ConfigError naming the fix."""
    value = float(margin) if isinstance(margin, numbers.Real) and not isinstance(margin, bool) else math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(
            f"{name} = {margin!r}: an equivalence margin must be a finite number > 0 (an infinite margin calls "
            f"any difference 'no effect'); give the smallest difference that matters, e.g. {name} = 0.1"
        )
    return value


@dataclass(frozen=True)
class Margin:
    """``margin`` = ``fraction`` x the reference's bound nearest 0 (NaN when the reference CI holds 0)."""

    fraction: float
    ref_mean: float
    ref_ci_low: float
    ref_ci_high: float
    margin: float


def relative_margin(
    ref_a: Float[np.ndarray, "n"],
    ref_b: Float[np.ndarray, "n"],
    fraction: float,
    *,
    level: float = 0.95,
    n_boot: int = 4000,
    seed: int = 0,
) -> Margin:
    """Margin = ``fraction`` x the smaller |end| of the percentile-bootstrap CI of mean(ref_a - ref_b).

    If that CI contains 0 the reference effect is not established and the margin is NaN (no equivalence
    claim can be sized from it).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"margin fraction must lie in (0, 1), got {fraction}")
    r = paired_test(ref_a, ref_b, alternative="two-sided", level=level, n_boot=n_boot, seed=seed)
    nearest = min(abs(r.ci_low), abs(r.ci_high)) if r.ci_low * r.ci_high > 0 else math.nan
    return Margin(fraction, r.mean, r.ci_low, r.ci_high, fraction * nearest)


def tost(d: Float[np.ndarray, "n"], margin: float) -> tuple[float, float, float]:
    """Two one-sided paired t-tests of mean(d) against -margin (H1: greater) and +margin (H1: less).

    Returns (p_lower, p_upper, p = max of the two); equivalence at level alpha when p < alpha.
    ``margin`` must be finite and > 0 (``check_margin``; a NaN margin, one that could not be sized, is the
    caller's to skip).
    """
    d = np.asarray(d, dtype=float)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"need at least two paired differences, got shape {d.shape}")
    margin = check_margin(margin)
    n, m, se = len(d), float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    if se == 0:
        inside = -margin < m < margin
        return (0.0, 0.0, 0.0) if inside else (1.0, 1.0, 1.0)
    p_lower = float(sps.t.sf((m + margin) / se, n - 1))
    p_upper = float(sps.t.cdf((m - margin) / se, n - 1))
    return p_lower, p_upper, max(p_lower, p_upper)
