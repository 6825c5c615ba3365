"""Every bootstrap draw in mechicl: contexts (or clusters of them) resampled with replacement.

A context contributes one value per readout slot; slots of one context are not independent, so every
interval resamples *contexts*, each carrying the mean over its slots. Inputs are per-context values
``[..., n]``; leading axes are independent quantities (e.g. head sets) resampled with the same draws, so
differences between them stay paired.

Two resampling units share one representation, the *counts* ``[n_boot, n]`` (how often each observation
enters each draw):

- contexts (``clusters=None``): ``bootstrap_indices`` draws ``n`` of ``n`` with replacement;
- clusters (``clusters`` = one id per observation, e.g. contexts that share task rows): whole clusters are
  drawn with replacement and bring all their observations (``cluster_counts``).

Contexts that share task rows are not independent. With ``items`` (each context's task rows, ``[n, m]``),
``mean_ci`` and ``ratio_ci`` widen the context interval about the estimate by the square root of the
shared-row design effect (``shared_row_design_effect``: a variance-components bound, the worst case of a
row-additive model). A pigeonhole (item x context) reweighting of whole contexts was tried first and left
the false-positive rate where the context bootstrap had it (31% against a nominal 2.5% when row effects
dominate): a context's value sums its rows' effects, so a per-context weight cannot resample them.

Seeds: ``seed`` is anything ``np.random.default_rng`` takes (an int, a list of ints, or a Generator, which
is used and advanced in place). The same seed gives the same draws in every function here.
Checked against ``scipy.stats.bootstrap`` and hand-written loops in ``tests/analysis/stats/test_bootstrap.py``.
Cost: ``O(n_boot x n)`` per quantity, no forwards; memory ``n_boot x n`` indices (8 bytes each).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jaxtyping import Float, Int

from mechicl.analysis.stats.intervals import percentile_interval
from mechicl.errors import ConfigError

MIN_DRAWS = 20  # fewer resamples cannot give a 95% percentile interval or a p-value below 0.05


def check_draws(n: int, name: str = "n_boot") -> int:
    """``n`` if it is a usable number of resamples (>= ``MIN_DRAWS``), else a ConfigError naming the fix."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < MIN_DRAWS:
        raise ConfigError(
            f"{name} = {n!r}: fewer than {MIN_DRAWS} resamples give a degenerate answer (one bootstrap draw gives "
            f"an interval that can exclude its own estimate; no permutations give p = 1); "
            f"use {name} >= {MIN_DRAWS} (the defaults are 1000-4000)"
        )
    return int(n)


def bootstrap_indices(n: int, n_boot: int, seed: Any = 0) -> Int[np.ndarray, "n_boot n"]:
    """``n_boot`` draws of ``n`` context indices with replacement (row b is draw b).

    One ``integers`` call; drawing row by row from the same generator gives the same rows.
    """
    return np.random.default_rng(seed).integers(0, n, size=(check_draws(n_boot), n))


def bootstrap_counts(n: int, n_boot: int, seed: Any = 0) -> Float[np.ndarray, "n_boot n"]:
    """How often each of ``n`` contexts enters each draw of ``bootstrap_indices`` (the same draws)."""
    idx = bootstrap_indices(n, n_boot, seed)
    flat = (idx + n * np.arange(len(idx))[:, None]).ravel()
    return np.bincount(flat, minlength=n * len(idx)).reshape(len(idx), n).astype(float)


def cluster_counts(clusters: Any, n_boot: int, seed: Any = 0) -> Float[np.ndarray, "n_boot n"]:
    """Cluster bootstrap: ``clusters`` holds one id per observation; each draw takes as many clusters as there
    are, with replacement, and every observation of a drawn cluster enters as often as its cluster was drawn."""
    _, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    per_cluster = bootstrap_counts(int(inverse.max()) + 1, n_boot, seed)
    return per_cluster[:, inverse.ravel()]


def shared_row_design_effect(items: Any) -> float:
    """How much contexts that share task rows inflate the variance of a mean over contexts (>= 1).

    ``items [n, m]``: each context's task rows (demonstrations, then the query last). The bound assumes the worst
    case of a row-additive model: a context's value is a sum of row effects with equal weight on its ``m - 1``
    demonstrations, so two contexts correlate by (shared rows) / (m - 1), and contexts with the same query by 1.
    Then ``Var(mean) = sigma^2 sum_cc' rho_cc' / n^2`` and the sample variance underestimates ``sigma^2`` by
    ``1 - mean off-diagonal rho``; the design effect is their product over the independent-context variance
    ``sigma^2 / n``. Its one-sided false-positive rate on a null simulation: ``docs/results/null_simulation.md``."""
    items = np.asarray(items)
    if items.ndim != 2 or items.shape[1] < 2:
        raise ValueError(f"items must be [contexts, rows per context >= 2], got shape {items.shape}")
    n, m = items.shape
    if n < 2:
        return 1.0
    _, inv = np.unique(items, return_inverse=True)
    inv = inv.reshape(items.shape)
    member = np.zeros((n, int(inv.max()) + 1))
    np.add.at(member, (np.arange(n)[:, None], inv), 1.0)
    rho = np.minimum(member @ member.T / (m - 1), 1.0)
    rho[inv[:, -1][:, None] == inv[:, -1][None]] = 1.0  # the same query row
    np.fill_diagonal(rho, 1.0)
    rho_bar = (rho.sum() - n) / (n * (n - 1))
    return float(max(1.0, rho.sum() / (n * max(1.0 - rho_bar, 1e-3))))


def widen_for_shared_rows(est: Any, lo: Any, hi: Any, items: Any) -> tuple[Any, Any]:
    """The context-bootstrap interval widened about ``est`` by the square root of the shared-row design effect."""
    if items is None:
        return lo, hi
    f = np.sqrt(shared_row_design_effect(items))
    return est - f * (est - lo), est + f * (hi - est)


def _draw_means(n: int, n_boot: int, seed: Any, clusters: Any) -> Any:
    """A function ``x [..., n] -> [..., n_boot]``: the mean of each draw, the same draws for every ``x``."""
    if clusters is None:
        idx = bootstrap_indices(n, n_boot, seed)
        return lambda x: x[..., idx].mean(-1)
    if np.shape(clusters) != (n,):
        raise ValueError(f"clusters must hold one id per observation ({n}), got shape {np.shape(clusters)}")
    w = cluster_counts(clusters, n_boot, seed)
    return lambda x: (x @ w.T) / w.sum(-1)


def bootstrap_means(
    x: Float[np.ndarray, "... n"], *, n_boot: int = 2000, seed: Any = 0, clusters: Any = None
) -> Float[np.ndarray, "... n_boot"]:
    """The mean of ``x`` over each bootstrap draw of its last axis (contexts, or ``clusters`` of them)."""
    x = np.asarray(x, dtype=float)
    return _draw_means(x.shape[-1], n_boot, seed, clusters)(x)


def mean_ci(
    x: Float[np.ndarray, "... n"],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: Any = 0,
    clusters: Any = None,
    items: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over contexts and its percentile-bootstrap interval (contexts, or ``clusters`` of them, resampled);
    with ``items`` (each context's task rows) widened by the shared-row design effect."""
    x = np.asarray(x, dtype=float)
    lo, hi = percentile_interval(bootstrap_means(x, n_boot=n_boot, seed=seed, clusters=clusters), level)
    lo, hi = widen_for_shared_rows(x.mean(-1), lo, hi, items)
    return x.mean(-1), lo, hi


def ratio_ci(
    num: Float[np.ndarray, "... n"],
    den: Float[np.ndarray, "n"],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: Any = 0,
    clusters: Any = None,
    items: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mean(num) / mean(den)`` and its percentile-bootstrap interval, numerator and denominator
    resampled together (the same draws); NaN where the mean denominator is not positive. With ``items``
    (each context's task rows) the interval is widened by the shared-row design effect."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    means = _draw_means(den.shape[-1], n_boot, seed, clusters)
    with np.errstate(all="ignore"):
        d = den.mean()
        est = np.where(d > 0, num.mean(-1) / d, np.nan)
        bd = means(den)
        boot = np.where(bd > 0, means(num) / bd, np.nan)
    lo, hi = percentile_interval(boot, level)
    lo, hi = widen_for_shared_rows(est, lo, hi, items)
    return est, lo, hi
