"""Intervals that need no resampling of their own: Student-t, Wilson, and the percentile interval of draws.

Checked against ``scipy.stats.t.interval`` and ``scipy.stats.binomtest(...).proportion_ci(method="wilson")``
in ``tests/analysis/stats/test_intervals.py``. Cost: O(n) numpy.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from jaxtyping import Float
from scipy import stats as sps


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


def percentile_interval(boot: Float[np.ndarray, "... n_boot"], level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of bootstrap draws along the last axis (NaN draws ignored; all-NaN gives NaN)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(boot, [50 * (1 - level), 50 * (1 + level)], axis=-1)
    return lo, hi
