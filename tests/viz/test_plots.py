"""Heatmaps and line plots: integer layer ticks, whole (wrapped) titles, the query slot marked."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mechicl.viz import plots


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions draw, kept instead of closed."""
    kept = []
    monkeypatch.setattr(plots.plt, "close", lambda fig: kept.append(fig))
    return kept


def test_heatmap_ticks_title_and_marked_slot(tmp_path, figures):
    title = "tiny on toy: resid (residual stream entering each block, by position), noise; " * 3
    plots.heatmap(
        np.random.default_rng(0).normal(size=(2, 30)),
        tmp_path / "h.png",
        title,
        xlabel="pos",
        xticklabels=[f"{p}:tem" for p in range(30)],
        center=0.0,
        mark_cols=[27, 29],
        mark_label="query readout slot",
    )
    ax = figures[0].axes[0]
    assert list(ax.get_yticks()) == [0, 1] and [t.get_text() for t in ax.get_yticklabels()] == ["0", "1"]
    assert " ".join(ax.get_title().split()) == " ".join(title.split())  # wrapped, nothing cut
    fig = figures[0]
    fig.canvas.draw()
    box = ax.title.get_window_extent(fig.canvas.get_renderer())
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width  # the wrapped title fits the figure's width
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["query readout slot"]
    assert len(ax.patches) == 2 and (tmp_path / "h.png").stat().st_size > 0


def test_line_plot_has_integer_ticks_for_integer_x(tmp_path, figures):
    df = pd.DataFrame({"layer": [0, 1], "value": [0.2, 0.5]})
    plots.line_plot(df, "layer", "value", tmp_path / "l.png", title="two layers")
    ticks = [t for t in figures[0].axes[0].get_xticks() if -0.5 <= t <= 1.5]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_heatmap_annotates_small_grids_only(tmp_path, figures):
    """Cells carry their value (2 decimals): black on a diverging map; on a sequential map white at or below the
    mean, black above; grids over 120 cells carry none."""
    v = np.array([[0.1, 0.9, 0.4], [0.25, 0.7, 0.05]])
    plots.heatmap(v, tmp_path / "seq.png", center=None)
    plots.heatmap(v - 0.5, tmp_path / "div.png")  # changes sign: centred on 0 (diverging)
    plots.heatmap(np.ones((11, 11)), tmp_path / "big.png")
    seq, div, big = (f.axes[0] for f in figures)
    mean = v.mean()
    expected = [(f"{x:.2f}", "black" if x > mean else "white") for x in v.reshape(-1)]  # row-major, as drawn
    assert [(t.get_text(), t.get_color()) for t in seq.texts] == expected
    assert [(t.get_text(), t.get_color()) for t in div.texts] == [(f"{x - 0.5:.2f}", "black") for x in v.reshape(-1)]
    assert len(big.texts) == 0
