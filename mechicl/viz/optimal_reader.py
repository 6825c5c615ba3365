"""Measured accuracy curves beside the Bayes-optimal reader's (organisms). Drawing only."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from mechicl.viz.plots import wrap_title  # noqa: E402


def accuracy_with_bayes(table: pd.DataFrame, path: Path, title: str) -> Path:
    """Accuracy against k from a table with ``condition``, ``k``, ``organism``, ``ci_low``, ``ci_high`` and
    ``bayes_accuracy``: each condition's measured curve with its 95% band, and its Bayes curve dashed."""
    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=120)
    for cond, d in table.groupby("condition", sort=False):
        d = d.sort_values("k")
        (ln,) = ax.plot(d["k"], d["organism"], marker="o", ms=3, label=str(cond))
        ax.fill_between(d["k"], d["ci_low"], d["ci_high"], color=ln.get_color(), alpha=0.2, lw=0)
        ax.plot(d["k"], d["bayes_accuracy"], ls="--", lw=1.2, color=ln.get_color(), label=f"{cond}: Bayes-optimal")
    ax.set_xlabel("number of in-context examples observed (k)")
    ax.set_ylabel("accuracy (vs. shown label)")
    ax.set_title(wrap_title(title, 5.6, 9), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
