"""The ideal learner's figures: the model's curves beside each ideal learner's, per condition. Drawing only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mechicl.viz.plots import line_plot


def learner_plots(curves: pd.DataFrame, folder: Path, title: str) -> None:
    """``bayes_log_likelihood.png`` and ``bayes_accuracy.png`` from ``curves`` (columns condition, source = model
    or bayes, learner, metric, k, mean, ci_low, ci_high): the model (own-prior rows) and every ideal learner."""
    c = curves[(curves.source == "bayes") | ((curves.source == "model") & (curves.learner == "own prior"))].copy()
    c["line"] = (
        c.condition
        + ": "
        + c.source.map({"model": "model", "bayes": "ideal learner, "})
        + c.learner.where(c.source == "bayes", "")
    )
    for metric, label in (
        ("log_likelihood", "log-likelihood of shown label"),
        ("accuracy", "accuracy (vs. shown label)"),
    ):
        line_plot(
            c[c.metric == metric],
            "k",
            "mean",
            folder / f"bayes_{metric}.png",
            hue="line",
            title=title,
            ylabel=label,
            band=("ci_low", "ci_high"),
            xlabel="number of in-context examples observed (k)",
        )
