"""The findings grid's plot: layer x head effect maps of one model, one panel per task, one colour scale."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mechicl.viz.plots import wrap_title  # noqa: E402


def effect_panels(
    maps: dict[str, np.ndarray],
    path: Path,
    title: str,
    *,
    marks: dict[str, list[tuple[int, int]]] | None = None,
    label: str = "share of the correct-vs-flipped gap closed",
) -> Path:
    """One ``[layer, head]`` heatmap per task side by side, diverging around 0 on a shared scale;
    ``marks[task]`` heads are outlined (e.g. the heads above their matched controls there)."""
    tasks = list(maps)
    n_layers, n_heads = next(iter(maps.values())).shape
    vmax = max(float(np.nanmax(np.abs(m))) for m in maps.values()) or 1.0
    w = min(3.2, 0.35 * n_heads + 1.0)
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(w * len(tasks) + 1.2, 0.22 * n_layers + 1.8), squeeze=False, sharey=True
    )
    im = None
    for ax, task in zip(axes[0], tasks):
        im = ax.imshow(maps[task], cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", origin="lower")
        ax.set_title(wrap_title(task, w, 9), fontsize=9)
        ax.set_xlabel("head")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        for l, h in (marks or {}).get(task, []):
            ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5))
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label=label, shrink=0.8)
    fig.suptitle(wrap_title(title, w * len(tasks) + 1.2, 10), fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
