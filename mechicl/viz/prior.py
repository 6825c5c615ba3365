"""`mechicl prior`'s figures: per prior bin, who wins at each k. Drawing only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mechicl.viz.plots import line_plot


def prior_figures(tab: pd.DataFrame, folder: Path, title: str) -> list[Path]:
    """``prior_sides.png``: the share of flipped-label slots still answered with the true class (the prior wins) per
    prior bin against k; ``prior_heads_<set>.png``: each head set's interchange effect (ΔP flipped - ΔP correct)
    per prior bin against k, with 95% CIs."""
    if not len(tab):
        return []
    t = tab.assign(k=tab.k_lo.astype(int))
    first = t[t.heads == t.heads.iloc[0]]
    out = [
        line_plot(
            first,
            "k",
            "sides_with_prior",
            folder / "prior_sides.png",
            hue="prior_bin",
            band=("sides_with_prior_ci_low", "sides_with_prior_ci_high"),
            title=f"Flipped labels: share of queries still answered with the true class, by zero-shot log-odds - {title}",
            ylabel="sides with the prior",
            xlabel="k (demonstrations before the query)",
        )
    ]
    for heads, g in t.groupby("heads", sort=False):
        out.append(
            line_plot(
                g,
                "k",
                "closed",
                folder / f"prior_heads_{heads.replace(' ', '_')}.png",
                hue="prior_bin",
                band=("closed_ci_low", "closed_ci_high"),
                title=f"{heads}: label information it carries (interchange), by zero-shot log-odds - {title}",
                ylabel="ΔP(true) flipped - ΔP(true) correct",
                xlabel="k (demonstrations before the query)",
            )
        )
    return out
