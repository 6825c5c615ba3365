"""Null simulation of the findings' intervals (issue 27, item 4): the one-sided false-positive rate at a nominal
2.5% (a 95% interval whose lower bound lies above 0 when the true mean is 0), on the smallest task pool.

    .venv/bin/python benchmarks/null_simulation.py

Contexts are real findings-cell validation draws on vega-cars (177 rows; the validation pool holds 57 of them;
32 contexts of k + 1 = 17 rows, seed i for simulation i); values follow ``analysis.stats.calibration``. Writes
``docs/results/null_simulation.{csv,md}``. No model; about a minute on this machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mechicl.analysis.heads.finder import FindingsConfig
from mechicl.analysis.stats.calibration import false_positive_rates
from mechicl.data.batches import stage_draws
from mechicl.data.tasks import load_task

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-sims", type=int, default=1000)
    ap.add_argument("--task", default="vega-cars")
    args = ap.parse_args()
    t0 = time.perf_counter()
    cfg, task = FindingsConfig(), load_task(args.task)
    draws = [np.asarray(stage_draws(task, cfg.sizes, cfg.k + 1, seed=i).ids["validate"]) for i in range(args.n_sims)]
    tab = false_positive_rates(draws, n_boot=1000)
    OUT.mkdir(parents=True, exist_ok=True)
    tab.to_csv(OUT / "null_simulation.csv", index=False)
    wide = tab.pivot(index="scenario", columns="interval", values="false_positive_rate").loc[tab.scenario.unique()]
    pool = len(np.unique(np.concatenate([d.ravel() for d in draws[:1]])))
    lines = [
        "# Null simulation: one-sided false-positive rate of the findings' intervals",
        "",
        f"Made by `.venv/bin/python benchmarks/null_simulation.py` ({args.n_sims} simulated cells, "
        f"{time.perf_counter() - t0:.0f} s, no model). Task {args.task}: the smallest pool; each cell's "
        f"{cfg.n_validate} validation contexts of {cfg.k + 1} rows come from {pool} rows (seed 0), so rows repeat "
        "across contexts. Nominal rate: 2.5% (the lower bound of a 95% interval above 0). Model of the values: "
        "`mechicl/analysis/stats/calibration.py`.",
        "",
        "| scenario | " + " | ".join(wide.columns) + " |",
        "|---|" + "---|" * len(wide.columns),
    ]
    for name, r in wide.iterrows():
        lines.append(f"| {name} | " + " | ".join(f"{x:.1%}" for x in r) + " |")
    (OUT / "null_simulation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
