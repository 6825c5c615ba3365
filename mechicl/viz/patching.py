"""Exact patching's figure: one sweep's effects as a layer x (position or head) map. Drawing only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mechicl.viz.plots import heatmap


def effect_map(
    effect: np.ndarray,
    path: Path,
    title: str,
    axes: tuple[str, str],
    ticks: Sequence[str] | None = None,
    query_pos: Sequence[int] = (),
) -> Path:
    """``effect`` ([rows, columns] named by ``axes``) centred on 0; on position axes the columns ``query_pos``
    (the query readout slot of each context) are outlined."""
    return heatmap(
        effect,
        path,
        title,
        xlabel=axes[1],
        ylabel=axes[0],
        xticklabels=ticks,
        center=0.0,
        label="effect",
        mark_cols=sorted(set(query_pos)) if axes[1] == "pos" else (),
        mark_label="query readout slot",
    )
