"""The circuit figure: heads as nodes (placed by layer), path effects above a threshold as labelled edges.

Drawing only: takes a tidy edge table (sender, receiver, input, effect, CI) and writes PNG and SVG.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from mechicl.data.names import head_name, parse_head  # noqa: E402

INPUT_COLORS = {"q": "tab:blue", "k": "tab:orange", "v": "tab:green", "logits": "tab:purple"}


def _layout(nodes: Sequence[str]) -> dict[str, tuple[float, float]]:
    """x = rank of the head within its layer (centred), y = layer; ``logits`` above the top layer."""
    heads = sorted({parse_head(n) for n in nodes if n != "logits"})
    pos: dict[str, tuple[float, float]] = {}
    top = max((l for l, _ in heads), default=0)
    for layer in sorted({l for l, _ in heads}):
        row = [h for l, h in heads if l == layer]
        for i, h in enumerate(row):
            pos[head_name(layer, h)] = (i - (len(row) - 1) / 2, float(layer))
    pos["logits"] = (0.0, top + 1.0)
    return pos


def circuit_figure(edges: pd.DataFrame, nodes: Sequence[str], paths: Sequence[Path], title: str = "") -> list[Path]:
    """Draw ``nodes`` and one arrow per row of ``edges`` (columns sender, receiver, input, effect, ci_low,
    ci_high), labelled ``input effect``, width by |effect|, colour by input; write each of ``paths``
    (the suffix picks the format: .png, .svg)."""
    pos = _layout(list(nodes) + ["logits"])
    fig, ax = plt.subplots(figsize=(7.0, 1.6 + 1.3 * (max(y for _, y in pos.values()) + 1)), dpi=130)
    big = float(edges["effect"].abs().max()) if len(edges) else 1.0
    for k, e in enumerate(edges.itertuples(index=False)):
        (x0, y0), (x1, y1) = pos[e.sender], pos[e.receiver]
        bend = 0.15 * ((k % 3) - 1)  # parallel edges into one head (q, k, v) do not overlap
        ax.annotate(
            "",
            xy=(x1, y1 - 0.12),
            xytext=(x0, y0 + 0.12),
            arrowprops=dict(
                arrowstyle="-|>",
                color=INPUT_COLORS.get(e.input, "grey"),
                lw=0.8 + 3.0 * abs(e.effect) / (big or 1.0),
                alpha=0.85,
                connectionstyle=f"arc3,rad={bend}",
            ),
        )
        t = 0.8 if e.receiver == "logits" else 0.35 + 0.1 * (k % 3)  # the logits edge passes the top layer's row
        ax.text(
            x0 + t * (x1 - x0),
            y0 + t * (y1 - y0),
            f"{e.input} {e.effect:+.2f}\n[{e.ci_low:+.2f}, {e.ci_high:+.2f}]",
            fontsize=6,
            ha="center",
            va="center",
            color=INPUT_COLORS.get(e.input, "grey"),
            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8),
        )
    for name, (x, y) in pos.items():
        ax.scatter([x], [y], s=700 if name != "logits" else 900, c="white", edgecolors="black", zorder=3)
        ax.text(x, y, name, ha="center", va="center", fontsize=7, zorder=4)
    xs = [x for x, _ in pos.values()]
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(min(y for _, y in pos.values()) - 0.5, max(y for _, y in pos.values()) + 0.5)
    ax.set_ylabel("layer")
    ax.set_xticks([])
    handles = [plt.Line2D([], [], color=c, lw=2, label=i) for i, c in INPUT_COLORS.items()]
    ax.legend(handles=handles, fontsize=7, loc="lower right", title="path into", title_fontsize=7)
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    fig.tight_layout()
    for p in paths:
        fig.savefig(p)
    plt.close(fig)
    return list(paths)
