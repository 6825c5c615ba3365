"""Calibration of the intervals on a null simulation: how often a 95% interval's lower bound lies above 0 when the
true mean is 0 (the one-sided false-positive rate, nominal 2.5%), for contexts that share task rows.

Each simulated cell takes real context draws (``items [n, m]``: the task rows of each context, query last, e.g.
a findings cell's validation stage on the smallest task pool) and gives context ``c`` the value::

    f_c = w_query u[query(c)] + w_demo * 4 * mean_{demonstrations} v + w_noise e_c     (u, v, e ~ N(0, 1))

with fresh ``u``, ``v``, ``e`` per simulation, so the true mean is 0 and contexts that share rows correlate. The
``SCENARIOS`` span the dependence: row effects only through demonstrations (the worst case for the context
bootstrap), only through queries, mixtures, and independent contexts. Cost: ``n_sims x n_boot x n`` numbers per
scenario and interval, no model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from mechicl.analysis.stats.bootstrap import mean_ci

SCENARIOS = {  # name: (w_query, w_demo, w_noise)
    "demonstration rows only": (0.0, 1.0, 0.0),
    "demonstrations + noise": (0.0, 1.0, 1.0),
    "demonstrations, weak query and noise": (0.3, 1.0, 0.3),
    "query rows only": (1.0, 0.0, 0.0),
    "query, demonstrations, noise": (1.0, 1.0, 1.0),
    "independent contexts": (0.0, 0.0, 1.0),
}


def simulate(items: np.ndarray, weights: tuple[float, float, float], seed: int) -> np.ndarray:
    """One null cell: ``f [n]`` for the contexts ``items [n, m]`` (module docstring)."""
    rng = np.random.default_rng([seed, 7])
    n_rows = int(items.max()) + 1
    u, v, e = rng.normal(size=n_rows), rng.normal(size=n_rows), rng.normal(size=len(items))
    wq, wd, we = weights
    return wq * u[items[:, -1]] + wd * 4.0 * v[items[:, :-1]].mean(1) + we * e


def false_positive_rates(draws: Sequence[np.ndarray], n_boot: int = 1000, level: float = 0.95) -> pd.DataFrame:
    """Per scenario: the share of simulated cells whose interval's lower bound lies above 0, for the context
    bootstrap and for the same interval widened by the shared-row design effect. ``draws``: one ``items`` array
    per simulated cell (real context draws; simulation ``i`` uses ``draws[i]`` and seed ``i``)."""
    rows = []
    for name, w in SCENARIOS.items():
        hits = {"context bootstrap": 0, "shared-row design effect": 0}
        for i, items in enumerate(draws):
            f = simulate(items, w, i)
            hits["context bootstrap"] += bool(mean_ci(f, n_boot=n_boot, level=level, seed=i)[1] > 0)
            hits["shared-row design effect"] += bool(mean_ci(f, n_boot=n_boot, level=level, seed=i, items=items)[1] > 0)
        for method, h in hits.items():
            rows.append(
                {"scenario": name, "interval": method, "n_sims": len(draws), "false_positive_rate": h / len(draws)}
            )
    return pd.DataFrame(rows)
