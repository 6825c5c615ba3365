"""Context-level (cluster) resampling: bootstrap CIs of means and ratios of means, sign-flip p-values.

A context contributes one value per readout slot; slots of one context are not independent, so every
interval resamples *contexts* (the cluster), each carrying the mean over its slots. Inputs are
per-context values ``[..., n_contexts]``; leading axes are independent quantities (e.g. head sets)
resampled with the same context draws, so differences between them stay paired.

Checked against ``scipy.stats.bootstrap`` (percentile method) and ``scipy.stats.permutation_test``
(``permutation_type="samples"``, sign flips) in ``tests/analysis/stats/test_resampling.py``.
Cost: ``O(n_boot x n)`` per quantity.
"""

from __future__ import annotations

import warnings

import numpy as np
from jaxtyping import Float


def _indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_interval(boot: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of bootstrap draws along the last axis (NaN draws ignored)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(boot, [50 * (1 - level), 50 * (1 + level)], axis=-1)
    return lo, hi


def mean_ci(
    x: Float[np.ndarray, "... n"], *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over contexts and its percentile-bootstrap interval (contexts resampled)."""
    x = np.asarray(x, dtype=float)
    idx = _indices(x.shape[-1], n_boot, seed)
    boot = x[..., idx].mean(-1)  # [..., n_boot]
    lo, hi = percentile_interval(boot, level)
    return x.mean(-1), lo, hi


def ratio_ci(
    num: Float[np.ndarray, "... n"],
    den: Float[np.ndarray, "n"],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mean(num) / mean(den)`` and its percentile-bootstrap interval, numerator and denominator
    resampled together (the same contexts); NaN where the mean denominator is not positive."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    idx = _indices(den.shape[-1], n_boot, seed)
    with np.errstate(all="ignore"):
        d = den.mean()
        est = np.where(d > 0, num.mean(-1) / d, np.nan)
        bd = den[idx].mean(-1)
        boot = np.where(bd > 0, num[..., idx].mean(-1) / bd, np.nan)
    lo, hi = percentile_interval(boot, level)
    return est, lo, hi


def sign_flip_p(
    d: Float[np.ndarray, "... n"], *, n_perm: int = 4000, alternative: str = "greater", seed: int = 0
) -> np.ndarray:
    """Monte-Carlo sign-flip p-value of ``mean(d) = 0`` (each context's difference symmetric under H0).

    The smallest reachable value is ``1 / (n_perm + 1)``: report p at that floor as "<=".
    """
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be greater, less or two-sided, not {alternative!r}")
    d = np.asarray(d, dtype=float)
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_perm, d.shape[-1]))
    obs = d.mean(-1)
    null = np.einsum("...n,pn->...p", d, signs) / d.shape[-1]
    if alternative == "greater":
        hits = (null >= obs[..., None] - 1e-12).sum(-1)
    elif alternative == "less":
        hits = (null <= obs[..., None] + 1e-12).sum(-1)
    else:
        hits = (np.abs(null) >= np.abs(obs)[..., None] - 1e-12).sum(-1)
    return (1 + hits) / (n_perm + 1)


def fmt_p(p: float, n_perm: int) -> str:
    """A Monte-Carlo p-value as text: at the floor ``1 / (n_perm + 1)`` it reads "<= floor"."""
    floor = 1 / (n_perm + 1)
    if not np.isfinite(p):
        return "n/a"
    return f"<= {floor:.2g}" if p <= floor * (1 + 1e-9) else f"{p:.3g}"
