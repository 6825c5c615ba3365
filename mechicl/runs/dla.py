"""`mechicl dla`: direct logit attribution per head and MLP, and the prior-vs-context table."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from jaxtyping import Int
from torch import Tensor

from mechicl.analysis.inside.dla import direct_logits, dla_table, prior_vs_context, zero_shot_prior
from mechicl.data.batches import zero_shot_batch
from mechicl.data.task import Task
from mechicl.models.base import LoadedModel
from mechicl.runs.command import in_folder
from mechicl.runs.folder import Clock, RunFolder
from mechicl.runs.inside_batches import (
    InsideConfig,
    Runs,
    batches_of,
    default_and_flipped,
    finish,
    header,
    inside_config,
)
from mechicl.runs.markdown import md_table
from mechicl.viz.dla import dla_maps


def compute_dla(
    loaded: LoadedModel, task: Task, cfg: InsideConfig, clock: Clock, progress: bool = True, runs: Runs | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, Int[Tensor, "batch example"]]:
    """The DLA table (both decompositions, both conditions), the prior-vs-context table and the zero-shot prior.

    Cost: one zero-shot forward per query, one forward per context and condition (none with ``runs``)."""
    model = loaded.model
    bd, bf = batches_of(loaded, task, cfg, runs)
    rd, rf = runs if runs is not None else (None, None)
    zs = zero_shot_batch(task, loaded.tokenizer, bd, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    prior = zero_shot_prior(model, zs, tuple(bd.example_ids.shape), max(cfg.batch_size, 32), progress)
    clock.lap("zero-shot prior")
    dd, df = (
        direct_logits(model, bd, cfg.batch_size, progress, rd),
        direct_logits(model, bf, cfg.batch_size, progress, rf),
    )
    clock.lap("DLA")
    tab = pd.concat([dla_table(dd, bd, prior, cfg.k_min), dla_table(df, bf, prior, cfg.k_min)], ignore_index=True)
    return tab, prior_vs_context(dd, df, bd, bf, prior, cfg.k_min), prior


def report_dla(loaded: LoadedModel, task: Task, cfg: InsideConfig, out: Path, progress: bool = True) -> str:
    """DLA (shown-label and prior-label decompositions) and the prior-vs-context table."""
    clock, folder = Clock(), RunFolder(out)
    tab, pvc, prior = compute_dla(loaded, task, cfg, clock, progress)
    bd = default_and_flipped(loaded, task, cfg)[0]
    folder.csv("dla.csv", tab)
    folder.csv("prior_vs_context.csv", pvc)
    dla_maps(tab, pvc, folder.path, f"{loaded.name} / {cfg.task}")
    tot = tab[tab.kind == "total"].pivot_table(index="decomposition", columns="condition", values="dla").reset_index()
    n = (prior == bd.true_labels)[:, cfg.k_min :].double().mean().item()
    cols = ["name", "context", "prior", "side", "dla_shown_default", "dla_shown_flipped", "dla_prior_default"]
    named = pvc[pvc.kind == "head"].rename(columns={"component": "name"})
    lines = header(
        "Direct logit attribution",
        loaded,
        cfg,
        "Logit difference = logit of the target label minus the mean of the other labels; the final "
        "norm's scale is frozen from each run. The zero-shot prior is the model's k = 0 prediction "
        f"for the same input (equal to the true label for {n:.1%} of queries).",
    )
    hs = tab[(tab.kind == "head") & (tab.condition == "default") & (tab.decomposition == "shown")]
    top = (
        hs.reindex(hs.dla.abs().sort_values(ascending=False).index).head(cfg.top).rename(columns={"component": "name"})
    )
    lines += [
        "## Model's mean logit difference",
        "",
        md_table(tot),
        "",
        f"## Top {cfg.top} heads by |DLA| on (shown label - other), default contexts",
        "",
        md_table(top[["name", "dla"]]),
        "",
        "## Prior vs context (heads; MLPs are in prior_vs_context.csv)",
        "context = how much of the component's direct effect flips with the label shown in context; "
        "prior = how much stays with the zero-shot label (see mechicl.analysis.inside.dla.prior_vs_context).",
        "",
        "Most on the context side (largest context - prior):",
        "",
        md_table(named.sort_values("side", ascending=False).head(5)[cols]),
        "",
        "Most on the prior side (smallest context - prior):",
        "",
        md_table(named.sort_values("side").head(5)[cols]),
    ]
    return finish(folder, cfg, lines, clock)


def command(args: argparse.Namespace) -> int:
    """`mechicl dla`: direct logit attribution and the prior-vs-context table on default vs flipped contexts."""
    cfg = inside_config(args)
    return in_folder(args, "dla", lambda m, t, out: report_dla(m, t, cfg, out))
