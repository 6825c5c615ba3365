"""Verdicts over k: reject, no effect within a margin, not enough draws."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mechicl.analysis.stats import NOT_ENOUGH, PairedResult, compare_over_k, decide
from mechicl.errors import ConfigError


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


def test_no_effect_needs_the_whole_ci_inside_the_margin():
    r = PairedResult(0.0, -0.2, 0.09, 0.5, 30)
    assert decide(r, 0.5, 0.05, 0.1, "greater") == NOT_ENOUGH
    assert decide(r, 0.5, 0.05, 0.25, "greater") == "no effect (within ±0.25)"
    assert decide(r, 0.01, 0.05, 0.25, "greater") == "reject"


@pytest.mark.parametrize("margin", [math.inf, -math.inf, math.nan, 0.0, -0.1])
def test_a_margin_that_is_not_finite_and_positive_is_a_config_error(margin):
    """Issue 30: min_effect = inf gave the verdict "no effect (within ±inf)"."""
    r = PairedResult(0.0, -0.2, 0.09, 0.5, 30)
    with pytest.raises(ConfigError, match="min_effect = .*finite number > 0"):
        decide(r, 0.5, 0.05, margin, "two-sided")
    with pytest.raises(ConfigError, match="min_effect"):
        compare_over_k(_raw(0.0, 0.05, 20), ("a", "m"), ("b", "m"), [0], min_effect=margin)
