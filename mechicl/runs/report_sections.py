"""The sections of `mechicl report`: figures drawn into the run folder and captions written from the run's numbers."""

from __future__ import annotations

import importlib.metadata as md
import platform

import pandas as pd

from mechicl.analysis.heads.replication import Replication
from mechicl.analysis.inside.attention import context_patterns
from mechicl.analysis.inside.frames import top_heads
from mechicl.analysis.patching.exact import PatchResult
from mechicl.data.task import Task
from mechicl.models.base import LoadedModel
from mechicl.models.machine import machine_line
from mechicl.runs.attention import plot_attention
from mechicl.runs.attribute import plot_label_vs_input, top_label_heads
from mechicl.runs.folder import RunFolder
from mechicl.runs.lens import plot_lens
from mechicl.runs.patch import write_patch_results
from mechicl.runs.report_behavior import behavior_section, ci
from mechicl.runs.report_circuit import circuit_section
from mechicl.runs.report_data import ReportConfig, ReportData
from mechicl.runs.report_prior import prior_section
from mechicl.runs.report_validation import validation_section
from mechicl.viz.plots import heatmap
from mechicl.viz.report_html import Figure, Note, Section, Table, View, attention_view
from mechicl.viz.report_plots import scatter

PACKAGES = ("mechicl", "torch", "transformer-lens", "transformers", "circuitsvis", "numpy", "pandas", "scipy")


def intro(loaded: LoadedModel, task: Task, cfg: ReportConfig) -> list[str]:
    return [
        f"Model {loaded.name} ({loaded.source}); task {task.name}: {task.description}. Seed {cfg.seed}. "
        "Every number in the captions below is computed by this run; the CSV files next to this page hold them all.",
        "Reading guide: behaviour first (does the model follow in-context labels?), then where in depth "
        "the flipped labels change the prediction, which heads attend to the labels, which carry them causally, "
        "whether ablating them matters more than ablating random heads, and which heads side with the prior.",
    ]


# ------------------------------------------------------------- 2. lens


def lens_section(folder: RunFolder, d: ReportData, title: str) -> Section:
    lens = d.lens
    plot_lens(folder, lens, title)
    g = lens.gap[lens.gap.metric == "accuracy_true"].set_index("depth")
    best = g["mean"].idxmax()
    crit = lens.critical_depth
    where = (
        f"flipped-label true-label accuracy departs from default at depth {crit} (gap {ci(g.loc[crit])})"
        if crit is not None
        else f"no depth shows a gap >= {lens.min_gap} with a CI above 0 (no critical layer)"
    )
    cap = (
        f"Logit lens: label-set accuracy read from the residual after each block (0 = embeddings), averaged over "
        f"readout slots with k >= {d.config.k_min}; {where}. The largest gap is {ci(g.loc[best])} at depth {best}. "
        "Caveat: the lens applies the final norm and unembedding to intermediate residuals the model never "
        "decodes there, so the critical layer is where the flip becomes readable, not necessarily where it is computed."
    )
    return Section(
        "Where the flip happens",
        (
            Figure(folder.path / "lens_accuracy.png", cap),
            Figure(
                folder.path / "lens_log_likelihood.png",
                "The same in log-likelihood of the true (and, for "
                "flipped contexts, the shown) label; the dashed line marks the critical depth if any.",
            ),
        ),
    )


# ------------------------------------------------------------- 3. attention


def attention_section(folder: RunFolder, loaded: LoadedModel, d: ReportData, title: str) -> Section:
    """Long because it writes five captioned figures and the interactive view."""
    r, top_n = d.attention, d.config.top
    heads = r.heads
    top = top_heads(heads, "label_attention", top_n)
    plot_attention(folder, r, top, title)
    b, pm, ind = top.iloc[0], top_heads(heads, "pm", 1).iloc[0], top_heads(heads, "induction", 1).iloc[0]
    blocks: list = [
        Figure(
            folder.path / "label_attention_default.png",
            f"Attention from readout slots to earlier label tokens, per head (default labels). {b['name']} puts "
            f"{b.label_attention:.2f} of its readout attention on earlier labels ({b.label_attention_flipped:.2f} "
            f"with flipped labels); the mean over heads is {heads.label_attention.mean():.2f}.",
        ),
        Figure(
            folder.path / "pm_default.png",
            f"PM score: attention to the labels of demonstrations whose input has the query's class, minus the other "
            f"labels. Highest: {pm['name']} ({pm.pm:.2f} with correct labels, {pm.pm_flipped:.2f} with flipped ones). "
            "A head that keeps its PM under flipped labels selects demonstrations by their input; one whose PM "
            "changes sign selects label tokens by the word they show.",
        ),
        Figure(
            folder.path / "induction.png",
            f"Induction score on repeated random tokens. Highest: {ind['name']} ({ind.induction:.2f}); "
            f"{b['name']}, the top label-attention head, scores {b.induction:.2f}.",
        ),
    ]
    if r.saliency is not None:
        sl = r.saliency.layers[r.saliency.layers.condition == "default"]
        wp, pq = sl.loc[sl.S_wp.idxmax()], sl.loc[sl.S_pq.idxmax()]
        blocks.append(
            Figure(
                folder.path / "saliency_layers.png",
                f"Attention saliency per layer (Wang et al.): text->label flow S_wp peaks at layer "
                f"{int(wp.layer)} ({wp.S_wp:.3g}), label->query flow S_pq at layer {int(pq.layer)} "
                f"({pq.S_pq:.3g}). Labels gathering their inputs early and the query reading labels "
                "late is the anchor picture.",
            )
        )
    sel = [(int(l), int(h)) for l, h in zip(top.layer, top["head"])]
    bd = r.batches[0]
    pats = context_patterns(loaded.model, bd, 0, sel, d.runs[0] if d.runs is not None else None)
    blocks.append(
        View(
            attention_view(bd, 0, loaded.tokenizer, pats, list(top.name)),
            f"Interactive: the {len(sel)} top label-attention heads on context 0 (default labels). Hover a "
            "head, then a [Q] token, to see where the readout slot looks; [L] marks label tokens.",
        )
    )
    blocks += (
        attattr_blocks(folder, d, title)
        if d.attattr is not None
        else [Note(integrated_gradients_pointer(loaded.name, d.config.task), pointer=True)]
    )
    return Section("Who looks at labels", tuple(blocks))


def attattr_blocks(folder: RunFolder, d: ReportData, title: str) -> list:
    """Raw attention beside attention attribution (AttAttr) for the heads with most label-token attribution."""
    g, n = d.attattr, d.config.n_patch
    plot_label_vs_input(folder, g, title)
    top = top_label_heads(g, d.config.top)
    best = top.iloc[0]
    lab_in = g[g.group.isin(["label", "input"]) & (g.condition == "flipped")].groupby("group").attribution.sum()
    return [
        Figure(
            folder.path / "attribution_label_vs_input.png",
            f"Attention attribution (AttAttr, integrated gradients over attention from a uniform-attention start, "
            f"m = {d.config.attribution_steps}) at the readout slot, summed over heads: label vs input tokens per layer, "
            f"on the {n} patching contexts, at layers {', '.join(map(str, sorted(set(g.layer))))} (the headline heads' "
            "layers; `mechicl attribute` runs every layer). Unlike raw attention it adds up to the change of the shown label's logit "
            f"difference. Over all layers, flipped labels: label tokens {lab_in.get('label', 0.0):+.3f}, input tokens "
            f"{lab_in.get('input', 0.0):+.3f}.",
        ),
        Table(
            top.reset_index(drop=True),
            f"Raw attention vs attribution on label tokens at the readout slot. {best['name']} carries the most "
            f"(|AttAttr| {abs(best.attribution_flipped):.3f} with flipped labels) while putting "
            f"{best.attention_flipped:.2f} of its attention there; `mechicl attribute` adds path IG and the "
            "comparison with exact patching.",
        ),
    ]


def integrated_gradients_pointer(model: str, task: str) -> str:
    """Section 3's pointer when the report ran with ``--no-attribution``."""
    return (
        f"Attention attribution (AttAttr, integrated gradients over attention) was left out of this run "
        f"(`--no-attribution`): drop that flag, or run `mechicl attribute --model {model} --task {task}` for AttAttr "
        "and path IG beside exact and first-order patching."
    )


# ------------------------------------------------------------- 4. patching


def patching_section(folder: RunFolder, d: ReportData, title: str) -> Section:
    p = d.patch
    write_patch_results(folder, [r for r in p.results if r.kind != "resid"], title)
    blocks: list = []
    for r in p.results:
        t = r.table()
        if r.kind == "resid":
            blocks.append(resid_figure(folder, r, t, p.window, title))
            continue
        best = t.loc[t.effect.abs().idxmax()]
        a0, a1 = r.axes
        role = f" ({best.role})" if "role" in t.columns else ""
        blocks.append(
            Figure(
                folder.path / f"{r.kind}_denoise.png",
                f"Denoising: patch {r.description} from the correct-label run into the flipped-label run "
                f"(0 = flipped run, 1 = correct run). Largest: {a0} {int(best[a0])}, {a1} {int(best[a1])}"
                f"{role} restores {best.effect:+.2f}; {int((t.effect.abs() > 0.1).sum())} of {len(t)} "
                f"cells move it by more than 0.1.",
            )
        )
    a, ag = p.attribution, p.agreement
    sc = scatter(
        a,
        "exact",
        "attribution",
        folder / "attribution_vs_exact.png",
        label="name",
        diagonal=True,
        title=f"{title}: attribution patching vs exact patching, head outputs",
        xlabel="exact patching (normalised)",
        ylabel="attribution estimate",
    )
    blocks.append(
        Figure(
            sc,
            f"Attribution patching (2 forwards + 1 backward) against exact patching of each head's "
            f"output: Spearman {ag['spearman']:.2f}, Pearson {ag['pearson']:.2f}, top-{int(ag['k'])} "
            f"overlap {ag['topk_overlap']:.2f}. Points far from the diagonal are heads where the "
            f"linear estimate misleads. Pair: {p.description}.",
        )
    )
    return Section("Who carries the label information causally", tuple(blocks))


def resid_figure(folder: RunFolder, r: PatchResult, t: pd.DataFrame, window: tuple[int, int], title: str) -> Figure:
    """The residual stream x position sweep, drawn over the positions it ran (absolute positions on the axis)."""
    lo, hi = window
    folder.csv("resid_denoise.csv", t)
    ticks = [f"{p}:{role[:3]}" for p, role in zip(range(lo, hi), r.pos_roles[lo:hi])]
    path = heatmap(
        r.values[:, lo:hi].float().numpy(),
        folder / "resid_denoise.png",
        f"{title}: residual stream by position, denoise; 0 = flipped run, 1 = correct run",
        xlabel="pos",
        xticklabels=ticks,
        center=0.0,
    )
    t = t[t.computed]
    best = t.loc[t.effect.abs().idxmax()]
    return Figure(
        path,
        f"Denoising the residual stream entering each block at one position (positions {lo}-{hi - 1}: "
        f"the last examples and the query; earlier positions not run). Largest: layer {int(best.layer)}, "
        f"pos {int(best.pos)} ({best.role}) restores {best.effect:+.2f}; "
        f"{int((t.effect.abs() > 0.5).sum())} of {len(t)} cells restore more than half. Look for high "
        "cells that move from label positions to the readout slot with depth: that is where the label "
        "information travels.",
    )


# ------------------------------------------------------------- 6. prior vs context


def build_sections(
    folder: RunFolder, loaded: LoadedModel, d: ReportData, title: str, rep: Replication | None
) -> list[Section]:
    return [
        behavior_section(folder, d, title),
        lens_section(folder, d, title),
        attention_section(folder, loaded, d, title),
        patching_section(folder, d, title),
        validation_section(folder, d, title),
        prior_section(folder, d, title),
        circuit_section(folder, d, rep, loaded.name),
    ]


# ------------------------------------------------------------- 8. run facts


def versions() -> str:
    out = []
    for p in PACKAGES:
        try:
            out.append(f"{p} {md.version(p)}")
        except md.PackageNotFoundError:
            continue
    return ", ".join(out + [f"python {platform.python_version()}"])


def facts_section(loaded: LoadedModel, cfg: ReportConfig, stages: pd.DataFrame, command: str) -> Section:
    facts = pd.DataFrame(
        [
            ("model", f"{loaded.name} ({loaded.source})"),
            ("task", cfg.task),
            ("seed", str(cfg.seed)),
            ("forwards (all stages)", f"{int(stages.forwards.sum())} over {int(stages.rows.sum())} context rows"),
            ("wall time (all stages, model load excluded)", f"{stages.seconds.sum():.0f} s"),
            ("machine", machine_line()),
            ("package versions", versions()),
            ("re-run", command),
        ],
        columns=["fact", "value"],
    )
    note = (
        "A forward = one call of the model's last block: a partial re-run that starts mid-model or only runs "
        "the query token counts as one. Stages do not share cached runs: attention, lens and DLA each run their "
        "own forwards on the same contexts."
    )
    return Section(
        "Run facts",
        (
            Table(facts, "Run facts."),
            Table(stages, "Stages: contexts, wall seconds and forwards (stages.csv). " + note, 1),
        ),
    )
