"""`mechicl circuit`'s figures: residual patching over position sets, sender x receiver path-effect maps per
receiver input, and the circuit figure of each path-patching run. Drawing only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mechicl.viz.circuit import circuit_figure
from mechicl.viz.plots import heatmap


def resid_set_maps(sets: pd.DataFrame, folder: Path, name: str) -> None:
    """``resid_sets_<direction>.png``: layer x position-set maps of ``sets`` (columns direction, layer, positions,
    value; ``patching.positions.patch_position_sets``)."""
    for d, df in sets.groupby("direction"):
        grid = df.pivot(index="layer", columns="positions", values="value")
        heatmap(
            grid.to_numpy(),
            folder / f"resid_sets_{d}.png",
            f"{name}: residual patched at all positions of a set ({d}; 1 = clean, 0 = corrupted)",
            xlabel="positions",
            xticklabels=list(grid.columns),
            center=None,
        )


def path_figures(
    mats: dict[str, pd.DataFrame],
    edges: pd.DataFrame,
    nodes: Sequence[str],
    folder: Path,
    stem: str,
    name: str,
    positions: str,
    mlps: str,
    threshold: float,
    n_eval: int,
) -> None:
    """``paths_<stem>_<input>.png`` per non-empty sender x receiver matrix in ``mats`` (input -> matrix) and
    ``circuit_<stem>.png``/``.svg`` drawing ``edges`` between ``nodes``."""
    for inp, mat in mats.items():
        if mat.size:
            heatmap(
                mat.to_numpy(),
                folder / f"paths_{stem}_{inp}.png",
                f"{name}: path effect sender ({positions} positions, MLPs {mlps}) -> {inp}",
                xlabel="receiver",
                ylabel="sender",
                xticklabels=list(mat.columns),
                label="normalised effect",
            )
    circuit_figure(
        edges,
        nodes,
        [folder / f"circuit_{stem}.png", folder / f"circuit_{stem}.svg"],
        f"{name}: path effects from sender heads' outputs at {positions} positions (MLPs {mlps}), |effect| >= "
        f"{threshold} with a 95% context-bootstrap interval over {n_eval} held-out contexts excluding 0",
    )
