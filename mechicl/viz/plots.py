"""Plots: the one heatmap and the one line plot (with CI bands) every command draws. Drawing only."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def wrap_title(title: str, width_in: float, fontsize: float) -> str:
    """``title`` wrapped to lines that fit a figure ``width_in`` inches wide at ``fontsize`` points (never clipped)."""
    chars = max(20, int(width_in * 72 * 0.9 / (0.6 * fontsize)))  # a character is at most ~0.6 em wide
    return "\n".join(textwrap.wrap(title, chars))


def heatmap(
    values: np.ndarray,
    path: Path,
    title: str = "",
    *,
    xlabel: str = "head",
    ylabel: str = "layer",
    xticklabels: Sequence[str] | None = None,
    center: float | None | str = "auto",
    label: str | None = None,
    mark_cols: Sequence[int] = (),
    mark_label: str = "",
) -> Path:
    """A rows x columns heatmap (rows = layers) with integer ticks and a wrapped, unclipped title.

    ``center``: a float draws diverging colours centred there; ``None`` a sequential map; ``"auto"``
    centres on 0 when the values change sign. Cells are annotated when there are at most 120.
    ``mark_cols``: columns outlined and named ``mark_label`` in a legend (e.g. the query readout slot).
    """
    v = np.asarray(values, dtype=float)
    n_rows, n_cols = v.shape
    if center == "auto":
        center = 0.0 if np.nanmin(v) < 0 < np.nanmax(v) else None
    w = min(18.0, max(4.0, 2.4 + (0.55 if n_cols <= 24 else 0.28) * n_cols))
    h = min(12.0, max(3.0, 1.2 + 0.28 * n_rows))
    fig, ax = plt.subplots(figsize=(w, h), dpi=120)
    if center is not None:
        lim = float(np.nanmax(np.abs(v - center))) or 1.0
        im = ax.imshow(v, aspect="auto", cmap="RdBu_r", vmin=center - lim, vmax=center + lim)
    else:
        im = ax.imshow(v, aspect="auto", cmap="viridis")
    _ticks(ax, n_rows, n_cols, xticklabels)
    _mark_columns(ax, n_rows, mark_cols, mark_label, xticklabels is None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if n_rows * n_cols <= 120:
        _annotate(ax, v, center is not None)
    fig.colorbar(im, ax=ax, label=label or "", shrink=0.8)
    ax.set_title(wrap_title(title, 0.8 * w, 8), fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _ticks(ax: plt.Axes, n_rows: int, n_cols: int, xticklabels: Sequence[str] | None) -> None:
    """Integer layer ticks (at most 24), and column ticks: the given labels (up to 80) or integers (at most 40)."""
    step = max(1, n_rows // 24)
    ax.set_yticks(range(0, n_rows, step), [str(r) for r in range(0, n_rows, step)], fontsize=7 if n_rows > 12 else 9)
    if xticklabels is not None and len(xticklabels) <= 80:
        ax.set_xticks(range(n_cols), list(xticklabels), rotation=90, fontsize=6)
    else:
        step = max(1, n_cols // 40)
        ax.set_xticks(range(0, n_cols, step), [str(c) for c in range(0, n_cols, step)], fontsize=7)


def _mark_columns(ax: plt.Axes, n_rows: int, cols: Sequence[int], label: str, integer_ticks: bool) -> None:
    """Outline columns ``cols`` (dashed), named ``label`` in a legend below the axes."""
    for i, c in enumerate(cols):
        ax.add_patch(
            plt.Rectangle(
                (c - 0.5, -0.5),
                1,
                n_rows,
                fill=False,
                edgecolor="black",
                lw=1.8,
                ls="--",
                label=label if i == 0 else None,
            )
        )
    if len(cols) and label:
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.12 if integer_ticks else -0.3), fontsize=7, frameon=False)


def _annotate(ax: plt.Axes, v: np.ndarray, diverging: bool) -> None:
    """Each cell's value, black on diverging maps, else white on the darker half of a sequential map."""
    mean = np.nanmean(v)
    for (i, j), x in np.ndenumerate(v):
        ax.text(
            j, i, f"{x:.2f}", ha="center", va="center", fontsize=6, color="black" if diverging or x > mean else "white"
        )


def head_grid(df: pd.DataFrame, value: str) -> np.ndarray:
    """``df[value]`` (columns layer, head) as a ``[layer, head]`` array (mean over duplicate rows)."""
    return df.pivot_table(index="layer", columns="head", values=value, aggfunc="mean").sort_index().to_numpy()


def head_map(folder: Path, df: pd.DataFrame, value: str, name: str, title: str, label: str | None = None) -> Path:
    """``folder / name``: the heatmap of ``df[value]`` per layer (rows) and head (columns)."""
    return heatmap(head_grid(df, value), folder / name, title, label=label or value)


def line_plot(
    df: pd.DataFrame,
    x: str,
    y: str,
    path: Path,
    hue: str | None = None,
    title: str = "",
    ylabel: str | None = None,
    band: tuple[str, str] | None = None,
    xlabel: str | None = None,
    vline: float | None = None,
    vline_label: str | None = None,
) -> Path:
    """One line per ``hue`` value of ``y`` against ``x``, with optional CI band columns and a marker line."""
    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=120)
    groups = df.groupby(hue, sort=False) if hue else [("", df)]
    for name, d in groups:
        d = d.sort_values(x)
        (ln,) = ax.plot(d[x], d[y], marker="o", ms=3, label=str(name) if hue else None)
        if band:
            ax.fill_between(d[x], d[band[0]], d[band[1]], color=ln.get_color(), alpha=0.2, lw=0)
    if vline is not None:
        ax.axvline(vline, color="grey", ls="--", lw=1, label=vline_label)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if pd.api.types.is_integer_dtype(df[x]):  # layers, depths, k: integer ticks only
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(wrap_title(title, 5.6, 9), fontsize=9)
    ax.grid(alpha=0.3)
    if hue or vline_label:
        ax.legend(fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
