"""The aggregation fits recover the weights that generated synthetic projections (the independent reference),
and the held-out comparison names the generating model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechicl.analysis.aggregation.fits import _sigmoid, fit_all
from mechicl.data.evidence import PLACEMENTS, flip_mask

K = 8


def _flips(n: int, seed: int) -> np.ndarray:
    masks = [torch.zeros(n, K, dtype=torch.bool)]
    masks += [flip_mask(K, m, p, n, seed) for p in PLACEMENTS for m in range(1, K)]
    return torch.stack([*masks, torch.ones(n, K, dtype=torch.bool)]).numpy()


DIST = np.arange(K, 0, -1)  # distance of demonstration j from the query
W_POS = np.array([0.9, 0.1, -0.3, 0.5, 0.0, 0.2, 0.4, -0.1])  # by distance 1..K
GENERATORS = {
    "sum": (lambda F: 0.25 + 0.3 * F.sum(-1), {"intercept": 0.25, "slope": 0.3}),
    "vote": (
        lambda F: -0.5 + 2.0 * _sigmoid((F.sum(-1) - 5.0) / 0.5),
        {"intercept": -0.5, "amplitude": 2.0, "mid": 5.0},
    ),
    "recency": (lambda F: (F * 0.8 * np.exp(-0.5 * (DIST - 1))).sum(-1), {"weight_last": 0.8, "decay": 0.5}),
    "position": (lambda F: (F[..., ::-1] * W_POS).sum(-1), {f"w_{d}": w for d, w in enumerate(W_POS, 1)}),
}


@pytest.mark.parametrize("model", list(GENERATORS))
def test_fit_recovers_generating_weights(model):
    f, truth = GENERATORS[model]
    rng = np.random.default_rng(1)
    Ff, Fe = _flips(40, 1), _flips(40, 2)
    yf = f(Ff) + rng.normal(0, 0.1, Ff.shape[:2])
    ye = f(Fe) + rng.normal(0, 0.1, Fe.shape[:2])
    params, comparison = fit_all(Ff, yf, Fe, ye, n_boot=200, seed=0)
    got = params[params["model"] == model].set_index("param")
    for name, value in truth.items():
        est, lo, hi = got.loc[name, ["estimate", "ci_low", "ci_high"]]
        assert abs(est - value) < 0.05, (name, est, value)
        assert lo - 0.02 <= value <= hi + 0.02, (name, lo, value, hi)  # grid parameters: one grid step of slack
    row = comparison.set_index("model")
    assert row.loc[model, "adequate"]
    nested = {
        "sum": {"sum", "recency", "position", "vote"},
        "recency": {"recency", "position"},
        "vote": {"vote"},
        "position": {"position"},
    }[model]
    assert set(row.index[row["adequate"]]) <= nested  # a model that cannot express the truth is worse held out
    assert row.loc[model, "heldout_r2"] > 0.9
