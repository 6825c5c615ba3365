"""`mechicl attention`'s figures: label-attention, PM and induction maps, the top head's attention per earlier
label, and attention saliency per layer and head. Drawing only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mechicl.viz.plots import head_map, line_plot


def attention_maps(
    folder: Path, label_mass: dict[str, pd.DataFrame], pm: pd.DataFrame, induction: pd.DataFrame, title: str
) -> None:
    """``label_attention_<cond>.png`` and ``pm_<cond>.png`` per condition (``label_mass``: condition -> one row
    per head; ``pm``: columns condition, layer, head, pm) and ``induction.png``."""
    for cond, mass in label_mass.items():
        head_map(
            folder,
            mass,
            "label_attention",
            f"label_attention_{cond}.png",
            f"attention from readout slots to earlier labels ({cond}) - {title}",
        )
        head_map(folder, pm[pm.condition == cond], "pm", f"pm_{cond}.png", f"PM score ({cond}) - {title}")
    head_map(folder, induction, "induction", "induction.png", f"induction score (repeated random tokens) - {title}")


def distance_curve(folder: Path, by_distance: pd.DataFrame, best: pd.Series, title: str) -> Path:
    """``label_attention_distance.png``: head ``best`` (layer, head, name)'s attention to one earlier label token
    against how many examples back it is, by condition and by whether the word is the query's class."""
    d = by_distance[(by_distance.layer == best.layer) & (by_distance["head"] == best["head"])].copy()
    d["series"] = d.condition + np.where(d.same_word, ", word = query's class", ", other word")
    d = d.groupby(["series", "distance"], as_index=False)["mean"].mean()
    return line_plot(
        d,
        "distance",
        "mean",
        folder / "label_attention_distance.png",
        hue="series",
        title=f"{best['name']}: attention per earlier label token - {title}",
        ylabel="attention to one label token",
        xlabel="distance (examples back)",
    )


def saliency_plots(folder: Path, layers: pd.DataFrame, heads: pd.DataFrame, title: str) -> None:
    """``saliency_layers.png`` (the three flows per layer and condition) and ``saliency_heads_default.png``."""
    sl = layers.melt(id_vars=["condition", "layer"], value_vars=["S_wp", "S_pq", "S_ww"], var_name="flow")
    sl["series"] = sl.flow + " (" + sl.condition + ")"
    line_plot(
        sl,
        "layer",
        "value",
        folder / "saliency_layers.png",
        hue="series",
        title=f"attention saliency per layer - {title}",
        ylabel="mean |sum_h A dL/dA| over pairs",
    )
    head_map(
        folder,
        heads[heads.condition == "default"],
        "saliency",
        "saliency_heads_default.png",
        f"saliency onto label tokens (default) - {title}",
    )
