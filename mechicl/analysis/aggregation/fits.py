"""How a head's projection depends on the flipped labels: sum, vote, recency or free per-position weights.

Observations are (context, rendering) pairs: ``y[r, b]`` (e.g. ``Projections.delta`` of one head) and
the flip indicators ``F[r, b, j]`` of the k demonstrations. With ``n = sum_j F_j`` (the count) and
``d_j = k - j`` the distance of demonstration j from the query (1 = the last demonstration):

* ``sum``       y = a + b n                                  (linear in the count)
* ``vote``      y = a + b sigmoid((n - mid) / width)          (saturating; small width = sign of the majority)
* ``recency``   y = a + b sum_j F_j exp(-decay (d_j - 1))     (b = weight of the last demonstration;
                                                              decay 0 is ``sum``, decay < 0 weighs early ones more)
* ``position``  y = a + sum_d w_d F_d                         (one free weight per distance d = 1..k)

``mid``, ``width`` and ``decay`` are fitted on a grid (their CIs are limited by its spacing), the linear
parameters by least squares at each grid point. CIs: percentile bootstrap over *contexts* (every
rendering of a resampled context comes along). Model comparison: fitted on one draw, scored on another
(held-out mean squared error per context; paired bootstrap CI of each model's excess over the best).
Cost: O(n_boot x grid x contexts) numpy, no forwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float

from mechicl.analysis.stats import bootstrap_counts, mean_ci, percentile_interval

MODELS = ("sum", "vote", "recency", "position")


@dataclass(frozen=True)
class Grids:
    """Grid of the nonlinear parameters (per k): vote midpoints/widths and recency decays."""

    n_mid_per_unit: int = 4
    widths: tuple[float, ...] = tuple(np.round(np.geomspace(0.05, 16.0, 24), 4))
    decays: tuple[float, ...] = tuple(np.round(np.linspace(-0.5, 2.0, 51), 4))

    def mids(self, k: int) -> np.ndarray:
        return np.linspace(0.0, float(k), self.n_mid_per_unit * k + 1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def features(
    model: str, flips: Bool[np.ndarray, "obs k"], grids: Grids = Grids()
) -> tuple[Float[np.ndarray, "grid obs p"], list[dict[str, float]], list[str]]:
    """Design matrices of ``model`` at every grid point, the grid parameters, and the linear parameters' names."""
    F = np.asarray(flips, dtype=float)
    k = F.shape[-1]
    one = np.ones(F.shape[:-1] + (1,))
    n = F.sum(-1, keepdims=True)
    if model == "sum":
        return np.concatenate([one, n], -1)[None], [{}], ["intercept", "slope"]
    if model == "position":
        by_distance = F[..., ::-1]  # column d-1 = distance d from the query
        return np.concatenate([one, by_distance], -1)[None], [{}], ["intercept", *(f"w_{d}" for d in range(1, k + 1))]
    if model == "vote":
        grid = [(m, w) for m in grids.mids(k) for w in grids.widths]
        X = np.stack([np.concatenate([one, _sigmoid((n - m) / w)], -1) for m, w in grid])
        return X, [{"mid": m, "width": w} for m, w in grid], ["intercept", "amplitude"]
    if model == "recency":
        dist = np.arange(k, 0, -1, dtype=float)  # d_j for j = 0..k-1
        X = np.stack(
            [np.concatenate([one, (F * np.exp(-lam * (dist - 1)))[..., None].sum(-2)], -1) for lam in grids.decays]
        )
        return X, [{"decay": lam} for lam in grids.decays], ["intercept", "weight_last"]
    raise ValueError(f"unknown model {model!r}; use one of {', '.join(MODELS)}")


def _solve(
    X: np.ndarray, ysum: np.ndarray, mult: np.ndarray, ctx: np.ndarray, yy: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares at every grid point for every row of context ``weights [B, contexts]``.

    Observations may be grouped: row o stands for ``mult[o]`` observations with design row ``X[:, o]`` and
    summed response ``ysum[o]``, in context ``ctx[o]``; ``yy[c]`` = sum of y^2 over context c.
    Returns (best grid index [B], coefficients [B, p])."""
    G, _, p = X.shape
    n_ctx = weights.shape[1]
    xtx = np.zeros((n_ctx, G, p, p))
    np.add.at(xtx, ctx, np.einsum("gop,goq,o->ogpq", X, X, mult))
    xty = np.zeros((n_ctx, G, p))
    np.add.at(xty, ctx, np.einsum("gop,o->ogp", X, ysum))
    A = np.einsum("bn,ngpq->bgpq", weights, xtx)
    c = np.einsum("bn,ngp->bgp", weights, xty)
    ridge = 1e-9 * np.maximum(np.einsum("bgpp->bg", A), 1e-12)[..., None, None] * np.eye(p)
    beta = np.linalg.solve(A + ridge, c[..., None])[..., 0]  # [B, G, p]
    sse = (weights @ yy)[:, None] - np.einsum("bgp,bgp->bg", beta, c)
    best = sse.argmin(1)
    return best, beta[np.arange(len(best)), best]


def _grouped(model: str, F: np.ndarray, y: np.ndarray, ctx: np.ndarray):
    """Observations grouped by (context, count) when the model sees only the count (sum, vote)."""
    if model not in ("sum", "vote"):
        return F, y, np.ones_like(y), ctx
    k = F.shape[-1]
    key = ctx * (k + 1) + F.sum(-1).astype(int)
    uniq, inv = np.unique(key, return_inverse=True)
    counts = uniq % (k + 1)
    Fg = np.arange(k)[None] >= (k - counts)[:, None]  # any mask with that count: the features see only n
    return Fg, np.bincount(inv, y), np.bincount(inv).astype(float), uniq // (k + 1)


@dataclass(frozen=True)
class ModelFit:
    """One model fitted to one head: point estimates, bootstrap CIs and per-context held-out errors.

    ``params``: name -> (estimate, ci_low, ci_high); ``heldout_sq[c]``: mean squared error of held-out
    context c (over its renderings). Memory: O(contexts)."""

    model: str
    params: dict[str, tuple[float, float, float]]
    fit_mse: float
    heldout_sq: np.ndarray = field(repr=False)
    heldout_r2: float
    n_params: int


def _as_obs(flips: Bool[np.ndarray, "rendering batch k"], y: Float[np.ndarray, "rendering batch"]):
    F, y = np.asarray(flips), np.asarray(y, dtype=float)
    ctx = np.broadcast_to(np.arange(y.shape[1])[None], y.shape).reshape(-1)
    return F.reshape(-1, F.shape[-1]), y.reshape(-1), ctx


def fit_model(
    model: str,
    flips: Bool[np.ndarray, "rendering batch k"],
    y: Float[np.ndarray, "rendering batch"],
    flips_eval: Bool[np.ndarray, "rendering batch2 k"],
    y_eval: Float[np.ndarray, "rendering batch2"],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    grids: Grids = Grids(),
) -> ModelFit:
    """Fit ``model`` on (``flips``, ``y``), bootstrap its parameters over contexts, score it on the eval draw."""
    F, yo, ctx = _as_obs(flips, y)
    n = y.shape[1]
    Fg, ysum, mult, cg = _grouped(model, F, yo, ctx)
    X, grid, names = features(model, Fg, grids)
    w = np.ones((1, n))
    if n_boot:
        w = np.concatenate([w, bootstrap_counts(n, n_boot, seed)])
    best, beta = _solve(X, ysum, mult, cg, np.bincount(ctx, yo * yo, minlength=n), w)
    vals = {nm: beta[:, i] for i, nm in enumerate(names)}
    for key in grid[0]:
        vals[key] = np.array([grid[g][key] for g in best])
    params = {}
    for nm, v in vals.items():
        lo, hi = percentile_interval(v[1:], level) if n_boot else (np.nan, np.nan)
        params[nm] = (float(v[0]), float(lo), float(hi))
    point = Grids(
        grids.n_mid_per_unit,
        (params["width"][0],) if model == "vote" else grids.widths,
        (params["decay"][0],) if model == "recency" else grids.decays,
    )
    mid = int(np.argmin(np.abs(grids.mids(F.shape[-1]) - params["mid"][0]))) if model == "vote" else 0
    predict = lambda flips_: features(model, flips_, point)[0][mid] @ beta[0]  # noqa: E731
    fit_res = yo - predict(F)
    Fe, ye, ce = _as_obs(flips_eval, y_eval)
    res = ye - predict(Fe)
    sq = np.bincount(ce, res**2) / np.bincount(ce)
    r2 = 1.0 - (res**2).sum() / ((ye - ye.mean()) ** 2).sum()
    return ModelFit(model, params, float((fit_res**2).mean()), sq, float(r2), len(names) + len(grid[0]))


def compare(fits: list[ModelFit], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per model: held-out MSE and R^2, and the excess held-out MSE over the best model with a paired
    bootstrap CI over held-out contexts (the best model's row is 0 [0, 0]). ``adequate``: the excess CI reaches
    0 (not distinguishable from the best); ``verdict``: the adequate model with the fewest parameters."""
    mse = np.stack([f.heldout_sq for f in fits])  # [model, context]
    best = int(mse.mean(1).argmin())
    d, lo, hi = mean_ci(mse - mse[best], n_boot=n_boot, seed=seed)
    out = pd.DataFrame(
        {
            "model": [f.model for f in fits],
            "n_params": [f.n_params for f in fits],
            "fit_mse": [f.fit_mse for f in fits],
            "heldout_mse": mse.mean(1),
            "heldout_r2": [f.heldout_r2 for f in fits],
            "excess_mse": d,
            "excess_ci_low": lo,
            "excess_ci_high": hi,
            "best": [i == best for i in range(len(fits))],
        }
    )
    out["adequate"] = out["excess_ci_low"] <= 0
    simplest = out[out["adequate"]].sort_values(["n_params", "heldout_mse"]).index[0]
    return out.assign(verdict=out.index == simplest)


def fit_all(
    flips,
    y,
    flips_eval,
    y_eval,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    models: tuple[str, ...] = MODELS,
    grids: Grids = Grids(),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every model on one head: (parameter table: model, param, estimate, ci_low, ci_high; comparison table)."""
    fits = [fit_model(m, flips, y, flips_eval, y_eval, n_boot=n_boot, seed=seed, grids=grids) for m in models]
    params = pd.DataFrame(
        [
            {"model": f.model, "param": p, "estimate": e, "ci_low": lo, "ci_high": hi}
            for f in fits
            for p, (e, lo, hi) in f.params.items()
        ]
    )
    return params, compare(fits, n_boot, seed)
