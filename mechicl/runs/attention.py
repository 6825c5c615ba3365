"""`mechicl attention`: label attention, PM and induction scores, saliency; tables, heatmaps, offline HTML views."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mechicl.analysis.inside import attention as A
from mechicl.analysis.inside.frames import top_heads
from mechicl.analysis.inside.saliency import Saliency, attention_saliency
from mechicl.data.batches import repeated_random_tokens
from mechicl.data.names import head_name
from mechicl.data.prompts import PromptBatch
from mechicl.data.task import Task
from mechicl.models.base import LoadedModel
from mechicl.runs.command import in_folder
from mechicl.runs.folder import Clock, RunFolder
from mechicl.runs.inside_batches import InsideConfig, Runs, batches_of, finish, header, inside_config
from mechicl.runs.markdown import md_table
from mechicl.viz.attention import attention_maps, distance_curve, saliency_plots
from mechicl.viz.html import attention_heads_html, readout_attention_html


@dataclass(frozen=True)
class AttentionResult:
    """Everything `mechicl attention` computes. ``heads``: one row per head (label attention under both
    conditions, PM, induction, saliency)."""

    label_attention: A.LabelAttention
    induction: pd.DataFrame
    saliency: Saliency | None
    heads: pd.DataFrame
    batches: tuple[PromptBatch, PromptBatch]


def compute_attention(
    loaded: LoadedModel,
    task: Task,
    cfg: InsideConfig,
    clock: Clock,
    progress: bool = True,
    saliency: bool = True,
    runs: Runs | None = None,
) -> AttentionResult:
    """Label attention and PM on default/flipped contexts, induction on repeated tokens, saliency (optional).

    Cost: one forward per context and condition (none with ``runs`` from ``inside.shared_runs``), one on the
    repeated tokens, and for saliency a forward and a backward per context and condition."""
    model = loaded.model
    bd, bf = batches_of(loaded, task, cfg, runs)
    pats = [
        A.readout_patterns(model, b, cfg.batch_size, progress, r)
        for b, r in zip((bd, bf), runs if runs is not None else (None, None))
    ]
    la = A.label_attention(model, [bd, bf], task.n_classes, cfg.k_min, patterns=pats)
    clock.lap("label attention")
    tokens, offset = repeated_random_tokens(loaded.tokenizer, model.cfg.d_vocab, loaded.prepend_bos, seed=cfg.seed)
    ind = A.induction_scores(model, tokens, offset)
    clock.lap("induction")
    heads = la.label_mass("default").merge(la.label_mass("flipped"), on=["layer", "head"], suffixes=("", "_flipped"))
    pm_w = la.pm.pivot_table(index=["layer", "head"], columns="condition", values="pm").reset_index()
    heads = heads.merge(pm_w.rename(columns={"default": "pm", "flipped": "pm_flipped"}), on=["layer", "head"])
    heads = heads.merge(ind, on=["layer", "head"])
    sal = None
    if saliency:
        sal = attention_saliency(model, [bd, bf], "last", cfg.k_min, progress=progress)  # one context a backward
        clock.lap("saliency")
        heads = heads.merge(
            sal.heads[sal.heads.condition == "default"][["layer", "head", "saliency"]], on=["layer", "head"]
        )
    return AttentionResult(la, ind, sal, heads, (bd, bf))


def plot_attention(folder: RunFolder, r: AttentionResult, top: pd.DataFrame, title: str) -> None:
    """Heatmaps (label attention, PM per condition, induction, saliency) and the top head's distance curve."""
    la = r.label_attention
    masses = {cond: la.label_mass(cond) for cond in ("default", "flipped")}
    attention_maps(folder.path, masses, la.pm, r.induction, title)
    distance_curve(folder.path, la.by_distance, top.iloc[0], title)
    if r.saliency is not None:
        saliency_plots(folder.path, r.saliency.layers, r.saliency.heads, title)


def _pages(folder: RunFolder, loaded: LoadedModel, r: AttentionResult, top: pd.DataFrame, n_heads: int) -> None:
    """The top heads on context 0, default and flipped; the last slot's attention over tokens."""
    sel = [(int(l), int(h)) for l, h in zip(top.layer.head(n_heads), top["head"].head(n_heads))]
    names = [head_name(l, h) for l, h in sel]
    for cond, b in zip(("default", "flipped"), r.batches):
        p = A.context_patterns(loaded.model, b, 0, sel)
        attention_heads_html(
            b,
            0,
            loaded.tokenizer,
            p,
            names,
            folder / f"attention_heads_{cond}.html",
            f"{loaded.name}: top label-attention heads, {cond} labels (context 0)",
            [f"Heads ranked by mean attention from readout slots to earlier label tokens: {', '.join(names)}."],
        )
        if cond == "default":
            last = int(b.readout_pos[0, -1])
            readout_attention_html(
                b,
                0,
                loaded.tokenizer,
                p[:, last, :].T,
                names,
                folder / "attention_to_labels.html",
                f"{loaded.name}: attention from the last readout slot (context 0, default labels)",
                [
                    "Colour = attention from the final [Q] slot to each token, one series per head "
                    "(pick it in the menu)."
                ],
            )


def report_attention(
    loaded: LoadedModel,
    task: Task,
    cfg: InsideConfig,
    out: Path,
    progress: bool = True,
    saliency: bool = True,
    html_heads: int = 6,
) -> str:
    """Label attention, PM, induction, saliency; tables, heatmaps, HTML views. Returns the markdown summary."""
    clock, folder = Clock(), RunFolder(out)
    r = compute_attention(loaded, task, cfg, clock, progress, saliency)
    la = r.label_attention
    folder.csv("label_attention.csv", la.mass)
    folder.csv("label_attention_by_distance.csv", la.by_distance)
    folder.csv("pm.csv", la.pm)
    folder.csv("induction.csv", r.induction)
    if r.saliency is not None:
        folder.csv("saliency_layers.csv", r.saliency.layers)
        folder.csv("saliency_heads.csv", r.saliency.heads)
    folder.csv("heads.csv", r.heads)
    top = top_heads(r.heads, "label_attention", cfg.top)
    plot_attention(folder, r, top, f"{loaded.name} / {cfg.task}")
    _pages(folder, loaded, r, top, html_heads)
    clock.lap("plots and HTML")
    mass = la.mass.groupby(["condition", "category"], as_index=False)["mean"].mean()
    lines = header("Attention", loaded, cfg)
    lines += [
        f"## Top {cfg.top} heads by attention to earlier label tokens (default labels)",
        "",
        md_table(
            top[
                ["name", "label_attention", "label_attention_flipped", "pm", "pm_flipped", "induction"]
                + (["saliency"] if r.saliency is not None else [])
            ]
        ),
        "",
        f"## Top {cfg.top} heads by PM score (correct labels)",
        "",
        md_table(top_heads(r.heads, "pm", cfg.top)[["name", "pm", "pm_flipped", "label_attention", "induction"]]),
        "",
        f"## Top {cfg.top} heads by induction score",
        "",
        md_table(top_heads(r.heads, "induction", cfg.top)[["name", "induction", "label_attention", "pm"]]),
        "",
        "## Mean attention mass per key category (all heads)",
        "",
        md_table(mass.pivot_table(index="category", columns="condition", values="mean").reset_index()),
        "",
    ]
    if r.saliency is not None:
        s = r.saliency.layers
        lines += [
            "## Attention saliency per layer (Wang et al.): S_wp text->labels, S_pq labels->query, S_ww rest",
            "",
            md_table(s[s.condition == "default"][["layer", "S_wp", "S_pq", "S_ww", "share_wp", "share_pq"]], 5),
        ]
    return finish(folder, cfg, lines, clock)


def command(args: argparse.Namespace) -> int:
    """`mechicl attention`: label attention, PM and induction scores, saliency on default vs flipped contexts."""
    cfg = inside_config(args)
    return in_folder(
        args, "attention", lambda m, t, out: report_attention(m, t, cfg, out, saliency=not args.no_saliency)
    )
