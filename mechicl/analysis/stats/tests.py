"""Hypothesis tests over context draws: the sign-flip permutation test, the paired test built on it, Holm.

Conditions are scored on the same context draws, so a comparison is a vector of per-context differences
``d_i = metric_a(i) - metric_b(i)``. Under H0 each ``d_i`` is symmetric about 0, so flipping signs at random
gives the null distribution of the mean (``sign_flip_p``). ``paired_test`` adds the mean's bootstrap CI;
``holm`` corrects a family of p-values.

Checked against ``scipy.stats.permutation_test(permutation_type="samples")``, ``scipy.stats.ttest_rel``-style
references and a brute-force Holm in ``tests/analysis/stats/test_tests.py``. Cost: ``O(n_perm x n)`` per test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Float

from mechicl.analysis.stats.bootstrap import bootstrap_indices, check_draws
from mechicl.analysis.stats.intervals import percentile_interval

ALTERNATIVES = ("greater", "less", "two-sided")


def sign_flip_p(
    d: Float[np.ndarray, "... n"], *, n_perm: int = 4000, alternative: str = "greater", seed: Any = 0
) -> np.ndarray:
    """Monte-Carlo sign-flip p-value of ``mean(d) = 0`` (each context's difference symmetric under H0).

    ``(1 + hits) / (1 + n_perm)``, a null mean within 1e-12 of the observed one counting as a hit (ties from
    rounding). The smallest reachable value is ``1 / (n_perm + 1)``: ``text.p_text`` writes it "p <= floor".
    Leading axes of ``d`` share the same sign flips. ``seed`` as in ``bootstrap`` (a Generator is advanced).
    """
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be greater, less or two-sided, not {alternative!r}")
    d = np.asarray(d, dtype=float)
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(check_draws(n_perm, "n_perm"), d.shape[-1]))
    obs = d.mean(-1)
    null = np.einsum("...n,pn->...p", d, signs) / d.shape[-1]
    if alternative == "greater":
        hits = (null >= obs[..., None] - 1e-12).sum(-1)
    elif alternative == "less":
        hits = (null <= obs[..., None] + 1e-12).sum(-1)
    else:
        hits = (np.abs(null) >= np.abs(obs)[..., None] - 1e-12).sum(-1)
    return (1 + hits) / (n_perm + 1)


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
    seed: Any = 0,
) -> PairedResult:
    """Test mean(a - b) = 0 against ``alternative`` ('two-sided', 'greater': a > b, 'less').

    The CI resamples contexts (``n_boot`` draws); the p-value comes from ``n_boot`` random sign flips of the
    differences (``sign_flip_p``), drawn after the bootstrap from the same generator.
    """
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be two-sided, greater or less, not {alternative!r}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"need at least two paired values, got shape {d.shape}")
    rng = np.random.default_rng(seed)
    lo, hi = percentile_interval(d[bootstrap_indices(len(d), n_boot, rng)].mean(1), level)
    p = sign_flip_p(d, n_perm=n_boot, alternative=alternative, seed=rng)
    return PairedResult(float(d.mean()), float(lo), float(hi), float(p), len(d))


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
