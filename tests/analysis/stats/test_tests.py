"""Sign-flip test, paired test and Holm against scipy.stats and hand-written loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from mechicl.analysis.stats import holm, paired_test, sign_flip_p
from mechicl.errors import ConfigError


def _loop_sign_flip_p(d: np.ndarray, n_perm: int, alternative: str, rng: np.random.Generator) -> float:
    """Brute force: the same sign draws, the null mean of each flip computed one at a time."""
    signs = rng.choice([-1.0, 1.0], size=(n_perm, len(d)))
    obs, hits = float(np.mean(d)), 0
    for s in signs:
        null = float(np.mean(s * d))
        if alternative == "greater":
            hits += null >= obs - 1e-12
        elif alternative == "less":
            hits += null <= obs + 1e-12
        else:
            hits += abs(null) >= abs(obs) - 1e-12
    return (1 + hits) / (n_perm + 1)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_sign_flip_p_equals_a_hand_written_loop(alternative):
    d = np.random.default_rng(3).normal(0.2, 1.0, size=25)
    p = sign_flip_p(d, n_perm=500, alternative=alternative, seed=4)
    assert p == pytest.approx(_loop_sign_flip_p(d, 500, alternative, np.random.default_rng(4)), abs=1e-15)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_sign_flip_p_matches_scipy_permutation_test(alternative):
    d = np.random.default_rng(7).normal(0.25, 1.0, size=30)
    p = sign_flip_p(d, n_perm=40000, alternative=alternative, seed=8)
    ref = sps.permutation_test(
        (d,), np.mean, permutation_type="samples", n_resamples=40000, alternative=alternative, random_state=9
    ).pvalue
    assert p == pytest.approx(ref, abs=0.01)


def test_sign_flip_p_approaches_scipys_exact_test():
    """At n = 10 scipy enumerates all 1024 sign patterns; the Monte-Carlo p converges to that exact p."""
    d = np.random.default_rng(1).normal(0.5, 1.0, size=10)
    exact = sps.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=2000, alternative="greater")
    assert sign_flip_p(d, n_perm=100000, seed=2) == pytest.approx(exact.pvalue, abs=0.004)


def test_leading_axes_share_the_sign_flips():
    d = np.random.default_rng(5).normal(0.1, 1, size=(3, 20))
    p = sign_flip_p(d, n_perm=300, seed=6)
    assert [float(x) for x in p] == [float(sign_flip_p(row, n_perm=300, seed=6)) for row in d]


@pytest.mark.parametrize("n_perm", [0, 1, 19])
def test_too_few_permutations_are_config_errors(n_perm):
    """Issue 30: n_perm = 0 printed p = 1.0 beside above_control = True."""
    with pytest.raises(ConfigError, match=r"n_perm = .*use n_perm >= 20"):
        sign_flip_p(np.ones(8), n_perm=n_perm)


def test_paired_test_is_the_bootstrap_then_the_sign_flips_of_one_generator():
    rng = np.random.default_rng(0)
    b = rng.normal(0, 1, 30)
    a = b + 0.3 + rng.normal(0, 0.5, 30)
    r = paired_test(a, b, alternative="greater", n_boot=400, seed=7)
    d = a - b
    g = np.random.default_rng(7)
    boot = [np.mean(d[g.integers(0, 30, size=30)]) for _ in range(400)]
    assert (r.ci_low, r.ci_high) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])), rel=1e-12)
    assert r.p_value == pytest.approx(_loop_sign_flip_p(d, 400, "greater", g), abs=1e-15)
    assert r.mean == pytest.approx(d.mean()) and r.n == 30


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_paired_test_agrees_with_ttest_rel_on_normal_differences(alternative):
    """For normal differences the permutation p and the paired t-test p estimate nearly the same thing."""
    rng = np.random.default_rng(2)
    b = rng.normal(0, 1, 200)
    a = b + 0.12 + rng.normal(0, 0.8, 200)
    r = paired_test(a, b, alternative=alternative, n_boot=40000, seed=3)
    assert r.p_value == pytest.approx(sps.ttest_rel(a, b, alternative=alternative).pvalue, abs=0.01)


def test_no_effect_is_not_rejected_and_calibrated():
    rng = np.random.default_rng(1)
    rejections = 0
    for s in range(200):
        a, b = rng.normal(0, 1, 40), rng.normal(0, 1, 40)
        rejections += paired_test(a, b, alternative="two-sided", n_boot=999, seed=s).p_value < 0.05
    assert rejections / 200 < 0.1  # nominal 5%


def test_direction_matters():
    rng = np.random.default_rng(2)
    b = rng.normal(0, 1, 100)
    a = b - 0.5
    assert paired_test(a, b, alternative="greater").p_value > 0.5
    assert paired_test(a, b, alternative="less").p_value < 0.01


def _holm_by_step_down(p: np.ndarray) -> np.ndarray:
    """Brute force from the definition: the adjusted p of H_i is the smallest alpha at which Holm's step-down
    procedure (reject the r-th smallest p while p_(r) <= alpha / (m - r + 1)) rejects H_i."""
    m = len(p)
    order = np.argsort(p)
    candidates = sorted({min(1.0, (m - r) * p[order[r]]) for r in range(m)} | {1.0})
    adj = np.ones(m)
    for alpha in reversed(candidates):
        rejected = set()
        for r, i in enumerate(order):
            if p[i] * (m - r) > alpha + 1e-15:
                break
            rejected.add(i)
        for i in rejected:
            adj[i] = alpha
    return adj


def test_holm_by_hand_and_by_the_step_down_definition():
    p = np.array([0.01, 0.04, 0.03, 0.20])
    # sorted 0.01, 0.03, 0.04, 0.20 -> 4*0.01, 3*0.03, max(0.09, 2*0.04), max(0.09, 0.20)
    assert np.allclose(holm(p), [0.04, 0.09, 0.09, 0.20])
    rng = np.random.default_rng(0)
    for m, _ in itertools.product((1, 2, 5, 9), range(20)):
        p = rng.uniform(0, 0.3, m) ** 2
        assert np.allclose(holm(p), _holm_by_step_down(p), rtol=0, atol=1e-15)
