"""Equivalence margins and TOST, and the paired statistics they rest on, checked against scipy.stats."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from mechicl.analysis.stats import paired_test, relative_margin, tost
from mechicl.errors import ConfigError


def test_tost_equals_two_one_sided_scipy_t_tests():
    rng = np.random.default_rng(0)
    for shift, margin in [(0.0, 0.2), (0.15, 0.2), (-0.1, 0.05), (0.3, 0.1)]:
        d = rng.normal(shift, 0.5, 60)
        p_lo, p_hi, p = tost(d, margin)
        assert p_lo == pytest.approx(sps.ttest_1samp(d, -margin, alternative="greater").pvalue, rel=1e-10)
        assert p_hi == pytest.approx(sps.ttest_1samp(d, margin, alternative="less").pvalue, rel=1e-10)
        assert p == max(p_lo, p_hi)


def test_tost_agrees_with_the_90_percent_t_interval():
    """Schuirmann: TOST at alpha rejects exactly when the (1 - 2 alpha) t-interval lies inside the margin."""
    rng = np.random.default_rng(1)
    for _s in range(40):
        d = rng.normal(rng.uniform(-0.2, 0.2), 0.4, 50)
        lo, hi = sps.t.interval(0.90, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
        assert (tost(d, 0.15)[2] < 0.05) == (-0.15 < lo and hi < 0.15)


@pytest.mark.parametrize("margin", [math.nan, math.inf, 0.0, -0.2, "0.1", True])
def test_tost_refuses_a_margin_that_is_not_finite_and_positive(margin):
    """An infinite margin would call any difference equivalent; NaN (a margin that could not be sized) is the
    caller's to skip (hypotheses.equivalence_margins does), not to pass."""
    with pytest.raises(ConfigError, match="finite number > 0"):
        tost(np.random.default_rng(0).normal(size=20), margin)


def test_relative_margin_is_the_fraction_of_the_bootstrap_bound_nearest_zero():
    rng = np.random.default_rng(2)
    b = rng.normal(-0.7, 0.3, 128)
    a = b + rng.normal(0.3, 0.25, 128)
    m = relative_margin(a, b, 0.15, n_boot=4000, seed=3)
    ref = sps.bootstrap((a - b,), np.mean, n_resamples=4000, method="percentile", random_state=3).confidence_interval
    assert m.ref_ci_low == pytest.approx(ref.low, abs=0.01) and m.ref_ci_high == pytest.approx(ref.high, abs=0.01)
    assert m.margin == pytest.approx(0.15 * m.ref_ci_low)
    neg = relative_margin(b, a, 0.15, seed=3)  # the reference's sign does not matter
    assert neg.margin == pytest.approx(0.15 * abs(neg.ref_ci_high))
    assert math.isnan(relative_margin(a, a + rng.normal(0, 0.3, 128), 0.15).margin)  # no established reference
    with pytest.raises(ValueError, match="fraction"):
        relative_margin(a, b, 1.5)


def test_paired_test_matches_scipy_bootstrap_and_permutation_test():
    """The bootstrap CI and the sign-flip p-value equal scipy's (Monte-Carlo error only)."""
    rng = np.random.default_rng(4)
    b = rng.normal(0, 1, 80)
    for shift in (0.0, 0.15, 0.4):
        a = b + shift + rng.normal(0, 0.6, 80)
        r = paired_test(a, b, alternative="two-sided", n_boot=20000, seed=5)
        ci = sps.bootstrap(
            (a - b,), np.mean, n_resamples=20000, method="percentile", random_state=5
        ).confidence_interval
        assert r.ci_low == pytest.approx(ci.low, abs=0.01) and r.ci_high == pytest.approx(ci.high, abs=0.01)
        perm = sps.permutation_test(
            (a, b), lambda x, y: np.mean(x - y), permutation_type="samples", n_resamples=20000, random_state=6
        ).pvalue
        assert r.p_value == pytest.approx(perm, abs=0.01)
