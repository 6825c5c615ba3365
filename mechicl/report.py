"""Turn tidy results into files: CSVs, the paper-style curves, and a markdown summary."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from mechicl.behavior import BehaviorResult, value_at  # noqa: E402

LABELS = {
    "accuracy": "accuracy (vs. shown label)",
    "log_likelihood": "log-likelihood of shown label",
    "entropy": "entropy over label set (nats)",
    "accuracy_true": "accuracy (vs. true label)",
    "log_likelihood_true": "log-likelihood of true label",
    "accuracy_initial": "accuracy (vs. initial label map)",
    "log_likelihood_initial": "log-likelihood under initial label map",
}


def plot_metric(summary: pd.DataFrame, metric: str, path: Path, title: str = "", vline: int | None = None) -> Path:
    """One line per condition with its 95% CI band, metric against k (``vline``: a label-map switch)."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=120)
    for cond, d in summary[summary.metric == metric].groupby("condition", sort=False):
        d = d.sort_values("k")
        (line,) = ax.plot(d.k, d["mean"], marker="o", ms=3, label=cond)
        ax.fill_between(d.k, d.ci_low, d.ci_high, color=line.get_color(), alpha=0.2, lw=0)
    if vline is not None:
        ax.axvline(vline, color="k", ls="--", lw=1, alpha=0.7, label=f"switch at k = {vline}")
    ax.set_xlabel("number of in-context examples observed (k)")
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(row: pd.Series) -> str:
    return f"{row['mean']:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]"


def summary_markdown(result: BehaviorResult) -> str:
    """Numbers at k = 0, a middle k and k_max, plus plain statements about the label effect."""
    s, cfg = result.summary, result.config
    model, task = s.model.iloc[0], s.task.iloc[0]
    conds = list(dict.fromkeys(s.condition))
    ks = sorted({0, min(4, cfg.k_max), cfg.k_max})
    lines = [
        f"# Behaviour: {model} on {task}",
        "",
        f"{cfg.n_contexts} context draws (the same draws for every condition), up to k = {cfg.k_max} "
        f"observed examples, seed {cfg.seed}. Means with 95% t-intervals over contexts. "
        f"Scores are against the label the prompt shows; probabilities are normalised over the label set. "
        f"Wall time {result.seconds:.0f} s.",
        "",
        "| condition | metric | " + " | ".join(f"k = {k}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for c in conds:
        for m in LABELS:
            if ((s.condition == c) & (s.metric == m)).any():
                lines.append(f"| {c} | {m} | " + " | ".join(_fmt(value_at(s, c, m, k)) for k in ks) + " |")
    lines += ["", "## What the curves show", ""]
    K = cfg.k_max
    if "default" in conds:
        d0, dK = value_at(s, "default", "accuracy", 0), value_at(s, "default", "accuracy", K)
        lines.append(f"- Default labels: accuracy goes from {d0['mean']:.3f} at k = 0 to {dK['mean']:.3f} at k = {K}.")
    if "flipped" in conds and "default" in conds:
        f0, fK = value_at(s, "flipped", "log_likelihood", 0), value_at(s, "flipped", "log_likelihood", K)
        dK = value_at(s, "default", "log_likelihood", K)
        rises = fK.ci_low > f0.ci_high
        lines.append(
            f"- Flipped labels: log-likelihood of the flipped label goes from {f0['mean']:.3f} (k = 0) to "
            f"{fK['mean']:.3f} (k = {K}); default labels reach {dK['mean']:.3f}. "
            + ("The rise is outside both CIs: the in-context labels move the predictions (the paper's NH1 effect)."
               if rises else "The CIs overlap: no clear effect of flipped in-context labels at this sample size.")
        )
        fa = value_at(s, "flipped", "accuracy", K)
        lines.append(f"- Flipped-label accuracy at k = {K}: {_fmt(fa)} (0.5 is chance for a balanced binary task).")
    if "random" in conds:
        rK = value_at(s, "random", "accuracy_true", K)
        lines.append(f"- Random labels: accuracy against the true label at k = {K} is {_fmt(rK)}.")
    return "\n".join(lines) + "\n"


def write_behavior(result: BehaviorResult, out: Path) -> dict[str, Path]:
    """Write raw.csv, summary.csv, one PNG per metric, summary.md and config.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    s = result.summary
    title = f"{s.model.iloc[0]} on {s.task.iloc[0]} ({result.config.n_contexts} contexts)"
    files = {"raw": out / "raw.csv", "summary": out / "summary.csv", "markdown": out / "summary.md"}
    result.raw.to_csv(files["raw"], index=False)
    s.to_csv(files["summary"], index=False)
    for metric in dict.fromkeys(s.metric):
        files[f"plot_{metric}"] = plot_metric(s, metric, out / f"{metric}.png", title)
    files["markdown"].write_text(summary_markdown(result))
    (out / "config.json").write_text(json.dumps(asdict(result.config), indent=2))
    return files
