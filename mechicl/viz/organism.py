"""An organism's figure: its accuracy against k beside the Bayes-optimal reader of its language. Drawing only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mechicl.viz.plots import line_plot


def organism_vs_bayes(t: pd.DataFrame, path: Path, name: str) -> Path:
    """``path``: per condition, the organism's accuracy (95% CI band) and the Bayes reader's, against k, from ``t``
    (columns condition, k, organism, ci_low, ci_high, bayes_accuracy; ``runs.organism.bayes_table``)."""
    series = pd.concat(
        [
            t.assign(series=t["condition"] + " organism", value=t["organism"], lo=t["ci_low"], hi=t["ci_high"]),
            t.assign(
                series=t["condition"] + " Bayes",
                value=t["bayes_accuracy"],
                lo=t["bayes_accuracy"],
                hi=t["bayes_accuracy"],
            ),
        ]
    )
    return line_plot(
        series,
        "k",
        "value",
        path,
        hue="series",
        band=("lo", "hi"),
        ylabel="accuracy against the shown labels",
        title=f"{name}: organism (95% CI) vs the Bayes-optimal reader of its language",
    )
