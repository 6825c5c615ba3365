"""The report's two extra plot kinds: a labelled scatter and a histogram with marked values. Drawing only."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _finish(fig: plt.Figure, ax: plt.Axes, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def scatter(
    df: pd.DataFrame,
    x: str,
    y: str,
    path: Path,
    label: str | None = None,
    n_labels: int = 8,
    title: str = "",
    xlabel: str | None = None,
    ylabel: str | None = None,
    diagonal: bool = False,
) -> Path:
    """``y`` against ``x``, one dot per row; the ``n_labels`` rows farthest from the origin carry ``df[label]``.
    ``diagonal`` draws y = x (e.g. an estimate against its exact value)."""
    fig, ax = plt.subplots(figsize=(5.6, 4.2), dpi=120)
    ax.scatter(df[x], df[y], s=14, alpha=0.7)
    if label is not None and len(df):
        far = df.assign(_r=np.hypot(df[x], df[y])).nlargest(n_labels, "_r")
        for _, r in far.iterrows():
            ax.annotate(str(r[label]), (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if diagonal and len(df):
        lo, hi = float(np.nanmin(df[[x, y]].to_numpy())), float(np.nanmax(df[[x, y]].to_numpy()))
        ax.plot([lo, hi], [lo, hi], color="grey", ls="--", lw=1, label="y = x")
        ax.legend(fontsize=8)
    ax.axhline(0, color="black", lw=0.5)
    ax.axvline(0, color="black", lw=0.5)
    return _finish(fig, ax, path, title, xlabel or x, ylabel or y)


def histogram(
    values: Sequence[float],
    path: Path,
    marks: Sequence[tuple[str, float]] = (),
    band: tuple[float, float] | None = None,
    title: str = "",
    xlabel: str = "",
    bins: int = 30,
) -> Path:
    """Histogram of ``values`` (e.g. a random control) with vertical lines at ``marks`` (name, value) and a
    shaded ``band`` (e.g. the marked value's confidence interval)."""
    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=120)
    v = np.asarray(values, dtype=float)
    ax.hist(v[np.isfinite(v)], bins=min(bins, max(5, len(v) // 2)), color="tab:grey", alpha=0.7, label="control")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (name, value), c in zip(marks, colours):
        ax.axvline(value, color=c, lw=2, label=name)
    if band is not None:
        ax.axvspan(band[0], band[1], color=colours[0], alpha=0.2, lw=0, label="95% CI")
    ax.legend(fontsize=8)
    return _finish(fig, ax, path, title, xlabel, "count")
