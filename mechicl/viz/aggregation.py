"""Evidence aggregation's figures: head and model measures against the number and placement of flipped labels,
direct vs total effect, and the steering curves. Drawing only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mechicl.viz.plots import line_plot


def evidence_curves(cur: pd.DataFrame, per_alpha: pd.DataFrame, folder: Path, name: str, n: int) -> None:
    """``curve_<series>[_total].png`` and ``direct_vs_total_<series>.png`` from the held-out curves ``cur``
    (``analysis.aggregation.direct.curves``), ``steering.png`` from ``per_alpha`` (``steering_tables``); ``n``:
    the held-out contexts named in the titles."""
    model_what = {
        "p_flipped": "P(flipped label)",
        "acc_flipped": "flipped label on top",
        "ld_flipped": "change of logit(flipped) - logit(true)",
    }
    every = cur[cur["query_class"] == "all"]
    for (series, measure), d in every.groupby(["series", "measure"], sort=False):
        what = model_what.get(series, f"{series} {'projection' if measure == 'direct' else 'total effect'} change")
        line_plot(
            d,
            "count",
            "mean",
            folder / f"curve_{series}{'_total' if measure == 'total' else ''}.png",
            hue="placement",
            band=("ci_low", "ci_high"),
            xlabel="flipped demonstration labels",
            ylabel=what,
            title=f"{name}: {what} at the query readout slot vs flipped labels ({n} held-out contexts, 95% CI)",
        )
    for series, d in every[every["measure"].isin(["direct", "total"])].groupby("series", sort=False):
        d = d.assign(line=d["measure"] + " " + d["placement"])
        line_plot(
            d,
            "count",
            "mean",
            folder / f"direct_vs_total_{series}.png",
            hue="line",
            band=("ci_low", "ci_high"),
            xlabel="flipped demonstration labels",
            ylabel="change of logit(flipped) - logit(true)",
            title=f"{name}: {series}'s direct projection and total effect (patched into m = 0, MLPs and later "
            f"heads recomputed) vs flipped labels ({n} held-out contexts, 95% CI)",
        )
    d = per_alpha[(per_alpha["metric"] == "p_flipped") & (per_alpha["query_class"] == "all")]
    d = d.assign(line=d["head"] + " " + d["vector"])
    line_plot(
        d,
        "alpha",
        "mean",
        folder / "steering.png",
        hue="line",
        band=("ci_low", "ci_high"),
        xlabel="alpha",
        ylabel="P(flipped label)",
        title=f"{name}: default-label contexts steered by alpha x the head's mean "
        f"flipped - default output ({n} held-out contexts, 95% CI)",
    )
