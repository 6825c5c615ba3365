"""Attention attribution's figures: AttAttr mass on label vs input tokens per layer, and head maps of AttAttr on
label tokens and of path IG. Drawing only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mechicl.viz.plots import head_grid, heatmap, line_plot


def label_vs_input(masses: pd.DataFrame, folder: Path, title: str) -> Path:
    """``attribution_label_vs_input.png``: ``masses`` (columns layer, attribution, series; ``runs.attribute.
    layer_masses``) per layer, one line per series."""
    return line_plot(
        masses,
        "layer",
        "attribution",
        folder / "attribution_label_vs_input.png",
        hue="series",
        title=f"AttAttr mass at the readout slot, label vs input tokens - {title}",
        ylabel="sum over heads of Attr (logit diff)",
    )


def attribution_maps(groups: pd.DataFrame, heads: pd.DataFrame, steps: int, folder: Path, title: str) -> None:
    """``attattr_label_{correct,flipped}.png`` from ``groups`` (columns condition, group, layer, head, attribution)
    and ``path_ig_heads.png`` from ``heads`` (columns layer, head, ig; path IG with ``steps`` Riemann steps)."""
    for cond in ("correct", "flipped"):
        lab = groups[(groups.condition == cond) & (groups.group == "label")]
        heatmap(
            head_grid(lab, "attribution"),
            folder / f"attattr_label_{cond}.png",
            f"AttAttr on label tokens at the readout slot ({cond} labels) - {title}",
            label="attribution",
        )
    heatmap(
        head_grid(heads, "ig"),
        folder / "path_ig_heads.png",
        f"path IG per head (m={steps}), flipped -> correct, normalised metric - {title}",
        label="IG",
    )
