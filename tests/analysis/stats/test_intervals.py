"""Student-t, Wilson and percentile intervals against scipy.stats and numpy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from mechicl.analysis.stats import percentile_interval, t_half_width, t_interval, wilson_interval


def test_t_interval_matches_scipy():
    x = np.array([0.2, 0.5, 0.1, 0.9, 0.4])
    for level in (0.9, 0.95):
        m, lo, hi = t_interval(x, level)
        ref = sps.t.interval(level, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
        assert np.isclose(m, x.mean()) and np.allclose([lo, hi], ref)
    assert t_interval(np.array([0.3])) == (0.3, 0.3, 0.3)


def test_t_interval_excludes_the_null_exactly_when_ttest_1samp_rejects():
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.normal(rng.uniform(-0.5, 0.5), 1, 25)
        _, lo, hi = t_interval(x)
        assert (lo > 0 or hi < 0) == (sps.ttest_1samp(x, 0).pvalue < 0.05)


def test_t_half_width_is_vectorised():
    std, n = np.array([1.0, 0.5, 2.0]), np.array([4, 10, 30])
    ref = [sps.t.ppf(0.975, k - 1) * s / np.sqrt(k) for s, k in zip(std, n)]
    assert np.allclose(t_half_width(std, n), ref)


@pytest.mark.parametrize("level", [0.9, 0.95])
def test_wilson_matches_scipy_binomtest(level):
    for n in (1, 7, 40):
        for k in {0, 1, n // 2, n - 1, n}:
            lo, hi = wilson_interval(k, n, level)
            ref = sps.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
            assert (float(lo), float(hi)) == pytest.approx((ref.low, ref.high), abs=1e-12)
    lo, hi = wilson_interval(np.array([0, 3, 5]), np.array([5, 5, 5]), level)  # vectorised
    assert lo.shape == (3,) and lo[0] == 0.0 and hi[2] == 1.0


def test_percentile_interval_ignores_nan_draws():
    boot = np.random.default_rng(1).normal(size=(2, 500))
    with_nan = boot.copy()
    with_nan[:, ::7] = np.nan
    lo, hi = percentile_interval(with_nan, 0.9)
    kept = [b[~np.isnan(b)] for b in with_nan]
    assert np.allclose(lo, [np.percentile(b, 5) for b in kept]) and np.allclose(
        hi, [np.percentile(b, 95) for b in kept]
    )
    lo, hi = percentile_interval(np.full(10, np.nan), 0.95)
    assert np.isnan(lo) and np.isnan(hi)
