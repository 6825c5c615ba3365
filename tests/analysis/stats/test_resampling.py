"""Context-level resampling helpers against scipy.stats.bootstrap and scipy.stats.permutation_test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from mechicl.analysis.stats.resampling import fmt_p, mean_ci, ratio_ci, sign_flip_p


def test_mean_ci_matches_scipy_percentile_bootstrap():
    x = np.random.default_rng(1).normal(0.3, 1.0, size=200)
    m, lo, hi = mean_ci(x, n_boot=20000, seed=2)
    ref = sps.bootstrap((x,), np.mean, n_resamples=20000, method="percentile", random_state=3).confidence_interval
    assert m == pytest.approx(x.mean())
    assert lo == pytest.approx(ref.low, abs=0.02) and hi == pytest.approx(ref.high, abs=0.02)


def test_ratio_ci_matches_scipy_paired_bootstrap():
    rng = np.random.default_rng(4)
    den = rng.uniform(0.2, 1.0, size=150)
    num = 0.4 * den + rng.normal(0, 0.1, size=150)
    est, lo, hi = ratio_ci(num, den, n_boot=20000, seed=5)
    ref = sps.bootstrap(
        (num, den),
        lambda a, b: a.mean() / b.mean(),
        paired=True,
        n_resamples=20000,
        method="percentile",
        random_state=6,
    ).confidence_interval
    assert est == pytest.approx(num.mean() / den.mean())
    assert lo == pytest.approx(ref.low, abs=0.01) and hi == pytest.approx(ref.high, abs=0.01)


def test_ratio_rows_share_context_draws():
    """Leading axes are resampled with the same contexts: a row's interval equals its own bootstrap."""
    rng = np.random.default_rng(0)
    den = rng.uniform(0.5, 1, size=40)
    num = rng.normal(size=(3, 40))
    est, lo, hi = ratio_ci(num, den, seed=9)
    e1, l1, h1 = ratio_ci(num[1], den, seed=9)
    assert (float(est[1]), float(lo[1]), float(hi[1])) == pytest.approx((float(e1), float(l1), float(h1)))


def test_ratio_without_a_positive_denominator_is_nan():
    est, lo, hi = ratio_ci(np.ones(5), -np.ones(5))
    assert np.isnan(est) and np.isnan(lo) and np.isnan(hi)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_sign_flip_p_matches_scipy_permutation_test(alternative):
    d = np.random.default_rng(7).normal(0.25, 1.0, size=30)
    p = sign_flip_p(d, n_perm=40000, alternative=alternative, seed=8)
    ref = sps.permutation_test(
        (d,), np.mean, permutation_type="samples", n_resamples=40000, alternative=alternative, random_state=9
    ).pvalue
    assert p == pytest.approx(ref, abs=0.01)


def test_sign_flip_p_floor_and_text():
    d = np.full(20, 1.0)  # every flip but the identity is smaller
    p = sign_flip_p(d, n_perm=999)
    assert p <= 2 / 1000
    assert fmt_p(1 / 1000, 999) == "<= 0.001" and fmt_p(0.25, 999) == "0.25"
