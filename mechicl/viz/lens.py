"""The logit lens's figures: true- and shown-label curves per depth, the critical depth marked. Drawing only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mechicl.viz.plots import line_plot


def lens_curves(summary: pd.DataFrame, critical_depth: int | None, folder: Path, title: str) -> list[Path]:
    """``lens_accuracy.png`` and ``lens_log_likelihood.png`` in ``folder`` from a lens summary (columns depth,
    metric, condition, mean, ci_low, ci_high; ``analysis.inside.lens.Lens.summary``)."""
    paths = []
    for metric in ("accuracy", "log_likelihood"):
        s = summary[summary.metric.isin([f"{metric}_true", f"{metric}_shown"])].copy()
        s["series"] = s.condition + " vs " + s.metric.str.replace(f"{metric}_", "") + " label"
        s = s[~((s.condition == "default") & s.metric.str.endswith("_shown"))]  # = true for default
        paths.append(
            line_plot(
                s,
                "depth",
                "mean",
                folder / f"lens_{metric}.png",
                hue="series",
                band=("ci_low", "ci_high"),
                title=f"logit lens ({metric}) - {title}",
                xlabel="blocks applied (0 = embeddings)",
                ylabel=metric.replace("_", " "),
                vline=critical_depth,
            )
        )
    return paths
