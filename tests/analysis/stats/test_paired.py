from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mechicl.analysis.stats.paired import NOT_ENOUGH, compare_over_k, holm, paired_test


def test_known_effect_is_detected():
    rng = np.random.default_rng(0)
    b = rng.normal(0, 1, 200)
    a = b + 0.3 + rng.normal(0, 0.5, 200)
    r = paired_test(a, b, alternative="greater")
    assert r.p_value < 0.001
    assert r.ci_low < 0.3 < r.ci_high and r.ci_low > 0


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


def test_holm_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.20])
    # sorted 0.01, 0.03, 0.04, 0.20 -> 4*0.01, 3*0.03, max(0.09, 2*0.04), max(0.09, 0.20)
    assert np.allclose(holm(p), [0.04, 0.09, 0.09, 0.20])


def _raw(diff: float, noise: float, n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (n, 3))
    frames = []
    for cond, shift in (("a", diff), ("b", 0.0)):
        v = base + shift + rng.normal(0, noise, (n, 3))
        frames.append(
            pd.DataFrame(
                {
                    "condition": cond,
                    "context": np.repeat(np.arange(n), 3),
                    "k": np.tile(np.arange(3), n),
                    "metric": "m",
                    "value": v.ravel(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def test_decisions_over_k():
    out = compare_over_k(_raw(0.5, 0.3, 100), ("a", "m"), ("b", "m"), [0, 1, 2], alternative="greater")
    assert (out.decision == "reject").all() and (out.p_holm >= out.p_value).all()
    null = compare_over_k(
        _raw(0.0, 0.05, 400), ("a", "m"), ("b", "m"), [0, 1, 2], alternative="two-sided", min_effect=0.1
    )
    assert (null.decision == "no effect (within ±0.1)").all()
    weak = compare_over_k(_raw(0.0, 3.0, 5), ("a", "m"), ("b", "m"), [0, 1, 2], alternative="two-sided", min_effect=0.1)
    assert (weak.decision == NOT_ENOUGH).all()


def test_missing_condition_is_named():
    with pytest.raises(KeyError, match="no results for condition 'c'"):
        compare_over_k(_raw(0, 1, 5), ("c", "m"), ("b", "m"), [0])


def test_t_interval_matches_scipy():
    from scipy import stats as sps

    from mechicl.analysis.stats.paired import t_interval

    x = np.array([0.2, 0.5, 0.1, 0.9, 0.4])
    m, lo, hi = t_interval(x)
    ref = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert np.isclose(m, x.mean()) and np.allclose([lo, hi], ref)
    assert t_interval(np.array([0.3])) == (0.3, 0.3, 0.3)
