"""Behaviour curves: one metric against k, one line per label condition with its 95% CI band. Drawing only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mechicl.viz.plots import line_plot

LABELS = {
    "accuracy": "accuracy (vs. shown label)",
    "log_likelihood": "log-likelihood of shown label",
    "entropy": "entropy over label set (nats)",
    "accuracy_true": "accuracy (vs. true label)",
    "log_likelihood_true": "log-likelihood of true label",
    "accuracy_initial": "accuracy (vs. initial label map)",
    "log_likelihood_initial": "log-likelihood under initial label map",
}
"""Axis label of each behaviour metric (``analysis.behavior.curves``)."""


def plot_metric(summary: pd.DataFrame, metric: str, path: Path, title: str = "", vline: int | None = None) -> Path:
    """One line per condition with its 95% CI band, metric against k (``vline``: a label-map switch)."""
    return line_plot(
        summary[summary.metric == metric],
        "k",
        "mean",
        path,
        hue="condition",
        title=title,
        ylabel=LABELS.get(metric, metric),
        band=("ci_low", "ci_high"),
        xlabel="number of in-context examples observed (k)",
        vline=vline,
        vline_label=None if vline is None else f"switch at k = {vline}",
    )
