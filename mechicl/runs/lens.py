"""`mechicl lens`: the logit lens per depth under default vs flipped contexts, and the critical layer."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from mechicl.analysis.inside.lens import Lens, logit_lens
from mechicl.data.task import Task
from mechicl.models.base import LoadedModel
from mechicl.runs.command import in_folder
from mechicl.runs.folder import Clock, RunFolder
from mechicl.runs.inside_batches import InsideConfig, Runs, batches_of, finish, header, inside_config
from mechicl.runs.markdown import md_table
from mechicl.viz.lens import lens_curves


def compute_lens(
    loaded: LoadedModel,
    task: Task,
    cfg: InsideConfig,
    progress: bool = True,
    min_gap: float = 0.05,
    runs: Runs | None = None,
) -> Lens:
    """The logit lens on the default and flipped batches of ``cfg`` (one forward per context and condition; none
    with ``runs`` from ``shared_runs``)."""
    bd, bf = batches_of(loaded, task, cfg, runs)
    return logit_lens(loaded.model, [bd, bf], cfg.k_min, min_gap, cfg.batch_size, progress, runs)


def plot_lens(folder: RunFolder, lens: Lens, title: str) -> None:
    """lens_accuracy.png and lens_log_likelihood.png: true/shown-label curves per depth, critical depth marked."""
    lens_curves(lens.summary, lens.critical_depth, folder.path, title)


def report_lens(
    loaded: LoadedModel, task: Task, cfg: InsideConfig, out: Path, progress: bool = True, min_gap: float = 0.05
) -> str:
    """Logit lens under default and flipped contexts and the critical layer. Returns the markdown summary."""
    clock, folder = Clock(), RunFolder(out)
    lens = compute_lens(loaded, task, cfg, progress, min_gap)
    clock.lap("lens")
    folder.csv("lens_raw.csv", lens.raw)
    folder.csv("lens_summary.csv", lens.summary)
    folder.csv("lens_gap.csv", lens.gap)
    plot_lens(folder, lens, f"{loaded.name} / {cfg.task}")
    piv = lens.summary.pivot_table(index="depth", columns=["metric", "condition"], values="mean")
    table = pd.DataFrame(
        {
            "depth": piv.index,
            "acc_default": piv[("accuracy_true", "default")].to_numpy(),
            "acc_flipped_true": piv[("accuracy_true", "flipped")].to_numpy(),
            "acc_flipped_shown": piv[("accuracy_shown", "flipped")].to_numpy(),
        }
    )
    g = lens.gap[lens.gap.metric == "accuracy_true"].set_index("depth")
    for col, src in (("gap", "mean"), ("gap_ci_low", "ci_low"), ("gap_ci_high", "ci_high")):
        table[col] = g.loc[table.depth, src].to_numpy()
    crit = lens.critical_depth
    verdict = (
        f"Critical layer: depth {crit} (the residual after block {crit - 1}) is the first where flipped "
        f"contexts lower true-label accuracy by >= {min_gap} with a 95% CI above 0."
        if crit is not None
        else f"No critical layer: at no depth does the flipped-context true-label accuracy fall below the "
        f"default one by >= {min_gap} with a 95% CI above 0."
    )
    lines = header(
        "Logit lens",
        loaded,
        cfg,
        f"Depth d = residual after d blocks (0 = embeddings, "
        f"{loaded.model.cfg.n_layers} = the model's output); label-set accuracy against the true label.",
    )
    lines += [
        verdict,
        "",
        f"## Top {cfg.top} depths by accuracy gap (default - flipped, true labels)",
        "",
        md_table(table.sort_values("gap", ascending=False).head(cfg.top)),
        "",
        "## All depths",
        "",
        md_table(table),
    ]
    return finish(folder, cfg, lines, clock)


def command(args: argparse.Namespace) -> int:
    """`mechicl lens`: the logit lens on default vs flipped contexts and the critical layer."""
    cfg = inside_config(args)
    return in_folder(args, "lens", lambda m, t, out: report_lens(m, t, cfg, out, min_gap=args.min_gap))
