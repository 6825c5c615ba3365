"""Direct logit attribution's figures: head maps per condition and decomposition, the prior-vs-context maps and
the MLP curves. Drawing only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mechicl.viz.plots import head_map, line_plot


def dla_maps(tab: pd.DataFrame, pvc: pd.DataFrame, folder: Path, title: str) -> None:
    """``dla_{shown,prior}_{default,flipped}.png``, ``prior_vs_context_{context,prior,side}.png`` and
    ``dla_mlp.png`` in ``folder`` from the DLA table and the prior-vs-context table (``runs.dla.compute_dla``)."""
    hd = tab[tab.kind == "head"]
    for cond in ("default", "flipped"):
        for dec in ("shown", "prior"):
            head_map(
                folder,
                hd[(hd.condition == cond) & (hd.decomposition == dec)],
                "dla",
                f"dla_{dec}_{cond}.png",
                f"DLA on ({dec} label - other), {cond} contexts - {title}",
                "logit difference",
            )
    ph = pvc[pvc.kind == "head"]
    for col in ("context", "prior", "side"):
        head_map(folder, ph, col, f"prior_vs_context_{col}.png", f"{col} part of each head's direct effect - {title}")
    mlp = tab[tab.kind == "mlp"].assign(series=lambda x: x.decomposition + " label, " + x.condition)
    line_plot(
        mlp,
        "layer",
        "dla",
        folder / "dla_mlp.png",
        hue="series",
        title=f"MLP direct effects - {title}",
        ylabel="logit difference",
    )
