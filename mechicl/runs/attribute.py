"""`mechicl attribute`: attention attribution that adds up (AttAttr, path IG) beside exact and first-order patching.

Builds one correct-label (clean) vs flipped-label (corrupted) pair, then:

* AttAttr (``analysis.gradients.attattr``) of every layer on both renderings, with the answer = the label the
  context shows at the query (so on flipped contexts a positive score pushes towards the flipped label);
* path IG (``analysis.gradients.path_ig``) per head and layer, its completeness at several step counts;
* exact head-output patching (``Patcher.sweep("head_out", "denoise")``) and first-order attribution
  patching (``attribution_patch``), ranked against exact patching with path IG
  (``integrated_gradients.ranking_comparison``), and the heads where first order and IG disagree in sign.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from mechicl.analysis.gradients.attattr import AttAttrResult, attattr, completeness_table, default_targets, head_groups
from mechicl.analysis.gradients.ig import ranking_comparison, sign_disagreements
from mechicl.analysis.gradients.path_ig import PathIGResult, path_ig
from mechicl.analysis.patching.attribution import attribution_patch
from mechicl.analysis.patching.exact import Patcher
from mechicl.data.names import head_name
from mechicl.data.pairs import PatchPair, pair_for
from mechicl.data.task import Task
from mechicl.models.base import LoadedModel
from mechicl.runs.command import in_folder
from mechicl.runs.folder import Clock, RunFolder
from mechicl.runs.markdown import md_table
from mechicl.viz.attribution import attribution_maps, label_vs_input
from mechicl.viz.html import attribution_html


@dataclass(frozen=True)
class AttributeConfig:
    """One `mechicl attribute` run. ``n_examples``: examples per context, the last is the query.

    Cost (L layers, b contexts, m steps): AttAttr ``~2 (m + 2) (L + 1) / 2`` forward-equivalents per
    rendering, path IG the same once per entry of ``completeness_steps`` (and once for ``steps``),
    exact patching ``~n_heads (L + 1) / 2``, first order 3.
    """

    model: str
    task: str
    n_contexts: int = 4
    n_examples: int = 8
    steps: int = 20
    completeness_steps: tuple[int, ...] = (1, 5, 20, 50)
    metric: str = "logit_diff"
    baseline: str = "uniform"
    last_m: int | None = None
    max_rows: int = 32
    top: int = 10
    view_heads: int = 4
    seed: int = 0


@dataclass(frozen=True)
class AttributeResult:
    """Everything `mechicl attribute` computes (tidy tables plus the raw per-layer AttAttr results)."""

    pair: PatchPair
    attattr: dict[str, list[AttAttrResult]]  # "correct" / "flipped" -> per layer
    groups: pd.DataFrame  # condition, layer, head, group, attribution, attribution_share, attention
    attattr_completeness: pd.DataFrame
    path: PathIGResult
    path_completeness: pd.DataFrame
    heads: pd.DataFrame  # layer, head, name, ig, first_order, exact
    ranking: pd.DataFrame
    disagreements: pd.DataFrame
    costs: pd.DataFrame


def attattr_both(
    loaded: LoadedModel, pair: PatchPair, cfg: AttributeConfig, layers: Sequence[int] | None = None
) -> dict[str, list[AttAttrResult]]:
    """AttAttr of ``layers`` (default every layer) on the pair's correct-label and flipped-label renderings
    (``cfg.steps``, ``cfg.baseline``). Cost: about ``2 (m + 2)`` forward + backward pairs per layer and rendering."""
    out = {}
    for cond, b in (("correct", pair.clean), ("flipped", pair.corrupted)):
        answer, foil = default_targets(b)
        out[cond] = attattr(
            loaded.model,
            b,
            answer,
            foil,
            steps=cfg.steps,
            metric=cfg.metric,
            baseline=cfg.baseline,
            layers=layers,
            max_rows=cfg.max_rows,
            progress=True,
        )
    return out


def _cost_row(method: str, fw: float, bw: float, seconds: float) -> dict:
    return {"method": method, "forwards": fw, "backwards": bw, "forward_equivalents": fw + bw, "seconds": seconds}


def compute_attribute(loaded: LoadedModel, task: Task, cfg: AttributeConfig, clock: Clock) -> AttributeResult:
    """Run every analysis of the module docstring on one freshly sampled pair."""
    pair = pair_for(loaded, task, cfg.n_contexts, cfg.n_examples, seed=cfg.seed, last_m=cfg.last_m)
    t0 = time.perf_counter()
    aa = attattr_both(loaded, pair, cfg)
    t_aa = time.perf_counter() - t0
    clock.lap("AttAttr")
    groups = attattr_groups(pair, aa)
    comp = pd.concat([completeness_table(rs).assign(condition=c) for c, rs in aa.items()], ignore_index=True)
    patcher = Patcher(loaded.model, pair, max_rows=cfg.max_rows)
    exact = patcher.sweep("head_out", "denoise")
    clock.lap("exact patching")
    t0 = time.perf_counter()
    fo = attribution_patch(loaded.model, pair, ("head_out",), "denoise")["head_out"]
    t_fo = time.perf_counter() - t0
    curve = [
        path_ig(loaded.model, pair, m, max_rows=cfg.max_rows, patcher=patcher)
        for m in cfg.completeness_steps
        if m != cfg.steps
    ]
    ig = path_ig(loaded.model, pair, cfg.steps, max_rows=cfg.max_rows, patcher=patcher, progress=True)
    clock.lap("path IG")
    path_comp = pd.concat([r.completeness() for r in sorted([*curve, ig], key=lambda r: r.steps)], ignore_index=True)
    heads = ig.table().assign(first_order=fo.effect.reshape(-1).numpy(), exact=exact.effect.reshape(-1).numpy())
    heads.insert(2, "name", [head_name(l, h) for l, h in zip(heads.layer, heads["head"])])
    ranking = ranking_comparison(
        exact.effect, {f"path IG (m={cfg.steps})": ig.heads, "first-order": fo.effect}, cfg.top
    )
    costs = pd.DataFrame(
        [
            _cost_row("exact patching (head_out)", exact.forwards, 0.0, exact.seconds),
            _cost_row("first-order attribution patching", 2.0, 1.0, t_fo),
            _cost_row(f"path IG (m={cfg.steps})", ig.forwards, ig.backwards, ig.seconds),
            _cost_row(
                f"AttAttr (m={cfg.steps}, both renderings)",
                sum(r.forwards for rs in aa.values() for r in rs),
                sum(r.backwards for rs in aa.values() for r in rs),
                t_aa,
            ),
        ]
    )
    return AttributeResult(
        pair,
        aa,
        groups,
        comp,
        ig,
        path_comp,
        heads,
        ranking,
        sign_disagreements(exact.effect, fo.effect, ig.heads),
        costs,
    )


def layer_masses(groups: pd.DataFrame) -> pd.DataFrame:
    """Per condition and layer: attribution summed over heads on label and on input tokens (readout slot)."""
    g = groups[groups.group.isin(["label", "input"])]
    g = g.groupby(["condition", "layer", "group"], as_index=False).attribution.sum()
    g["series"] = g.group + " tokens (" + g.condition + " labels)"
    return g


def attattr_groups(pair: PatchPair, aa: dict[str, list[AttAttrResult]]) -> pd.DataFrame:
    """Tidy AttAttr per (condition, layer, head, key group) at the last readout slot."""
    return pd.concat(
        [head_groups(rs, b).assign(condition=c) for (c, rs), b in zip(aa.items(), (pair.clean, pair.corrupted))]
    )


def plot_label_vs_input(folder: RunFolder, groups: pd.DataFrame, title: str) -> Path:
    """``attribution_label_vs_input.png``: per layer, AttAttr mass on label vs input tokens, both conditions."""
    return label_vs_input(layer_masses(groups), folder.path, title)


def _plots_and_view(
    folder: RunFolder, loaded: LoadedModel, r: AttributeResult, cfg: AttributeConfig, title: str
) -> list[str]:
    """Per-layer label-vs-input plot, head heatmaps, the HTML view; returns the viewed head names."""
    plot_label_vs_input(folder, r.groups, title)
    attribution_maps(r.groups, r.heads, cfg.steps, folder.path, title)
    lab = r.groups[(r.groups.condition == "flipped") & (r.groups.group == "label")]
    top = lab.reindex(lab.attribution.abs().sort_values(ascending=False).index).head(cfg.view_heads)
    sel = [(int(l), int(h)) for l, h in zip(top.layer, top["head"])]
    names = [head_name(l, h) for l, h in sel]
    by_layer = {res.layer: res for res in r.attattr["flipped"]}
    pats = torch.stack([by_layer[l].pattern[0, h] for l, h in sel])  # [head, query, key], context 0
    atts = torch.stack([by_layer[l].attr[0, h] for l, h in sel])
    attribution_html(
        r.pair.corrupted,
        0,
        loaded.tokenizer,
        pats,
        atts,
        names,
        folder / "attribution_view.html",
        f"{title}: raw attention vs AttAttr, flipped labels (context 0)",
        [
            f"Heads with the largest |AttAttr| on label tokens at the readout slot: {', '.join(names)}. "
            "Attribution = A * mean_alpha dF/dA(alpha A), F = logit(shown label) - logit(other) at the query."
        ],
    )
    return names


def top_label_heads(groups: pd.DataFrame, n: int) -> pd.DataFrame:
    """Heads ranked by |AttAttr on label tokens| at the readout slot (flipped labels), with raw attention beside."""
    lab = groups[groups.group == "label"].pivot_table(
        index=["layer", "head"], columns="condition", values=["attribution", "attribution_share", "attention"]
    )
    lab.columns = [f"{v}_{c}" for v, c in lab.columns]
    lab = lab.reset_index()
    lab.insert(0, "name", [head_name(l, h) for l, h in zip(lab.layer, lab["head"])])
    lab = lab.reindex(lab.attribution_flipped.abs().sort_values(ascending=False).index).head(n)
    return lab[
        [
            "name",
            "attention_flipped",
            "attribution_flipped",
            "attribution_share_flipped",
            "attention_correct",
            "attribution_correct",
        ]
    ]


def summary_lines(loaded: LoadedModel, r: AttributeResult, cfg: AttributeConfig, viewed: list[str]) -> list[str]:
    """The markdown summary: top heads, label vs input per layer, completeness, ranking, sign disagreements, cost."""
    pc = r.path_completeness.pivot_table(index="layer", columns="steps", values="residual").reset_index()
    pc.columns = ["layer", *[f"residual m={m}" for m in pc.columns[1:]]]
    masses = layer_masses(r.groups).pivot_table(index="layer", columns="series", values="attribution").reset_index()
    ac = r.attattr_completeness[
        ["condition", "layer", "steps", "baseline", "sum_attr", "f_full_minus_f_base", "residual", "max_abs_residual"]
    ]
    dis = r.disagreements
    return [
        f"# Attention attribution: {loaded.name} on {cfg.task}",
        "",
        f"{cfg.n_contexts} contexts x {cfg.n_examples} examples (seed {cfg.seed}), {r.pair.description}. "
        f"Riemann midpoint rule, m = {cfg.steps} steps unless stated. AttAttr ({cfg.baseline} baseline) metric "
        f"F = {cfg.metric} of the shown label vs the next class at the query readout slot, per context; path IG metric = normalised logit "
        f"difference (0 = flipped-label run, 1 = correct-label run).",
        "",
        f"## Top {cfg.top} heads by |AttAttr on label tokens| at the readout slot (flipped labels)",
        "",
        "Raw attention = share of the readout slot's attention on label tokens; attribution = its AttAttr "
        "(logit-difference units); share = label attribution / the head's total |attribution| over key groups.",
        "",
        md_table(top_label_heads(r.groups, cfg.top)),
        "",
        "## Attribution mass per layer at the readout slot: label vs input tokens (sum over heads)",
        "",
        md_table(masses),
        "",
        "## AttAttr completeness: sum of Attr vs F(A) - F(baseline) (means over contexts)",
        "",
        md_table(ac, 4),
        "",
        "## Path IG completeness: heads + rest - (M(clean) - M(corrupted)) per layer",
        "",
        md_table(pc, 5),
        "",
        "## Per-head ranking against exact patching (head_out, denoise)",
        "",
        md_table(r.ranking),
        "",
        f"## Heads where first-order attribution patching and path IG disagree in sign ({len(dis)})",
        "",
        md_table(dis) if len(dis) else "None.",
        "",
        "## Cost (forward-equivalents: forwards of the pair's batch + activation-only backwards, one each)",
        "",
        md_table(r.costs, 1),
        "",
        f"View: `attribution_view.html` ({', '.join(viewed)}).",
    ]


def run_attribute(loaded: LoadedModel, task: Task, cfg: AttributeConfig, out: Path) -> tuple[RunFolder, str]:
    """Compute, then write CSVs, plots, the HTML view, summary.md and config.json; returns the folder and summary."""
    clock = Clock()
    r = compute_attribute(loaded, task, cfg, clock)
    folder = RunFolder(out)
    folder.csv("attattr_groups.csv", r.groups)
    folder.csv("attattr_completeness.csv", r.attattr_completeness)
    folder.csv("path_ig_heads.csv", r.heads)
    folder.csv("path_ig_completeness.csv", r.path_completeness)
    folder.csv("ranking.csv", r.ranking)
    folder.csv("sign_disagreements.csv", r.disagreements)
    folder.csv("costs.csv", r.costs)
    viewed = _plots_and_view(folder, loaded, r, cfg, f"{loaded.name} / {cfg.task}")
    clock.lap("plots and HTML")
    text = "\n".join([*summary_lines(loaded, r, cfg, viewed), "", clock.line()]) + "\n"
    folder.text("summary.md", text)
    folder.json("config.json", cfg)
    return folder, text


def command(args: argparse.Namespace) -> int:
    """`mechicl attribute`: AttAttr and path IG beside exact and first-order patching, correct- vs flipped-label
    contexts."""
    cfg = AttributeConfig(
        args.model,
        args.task,
        args.n_contexts,
        args.k + 1,
        args.steps,
        args.completeness_steps,
        args.metric,
        args.baseline,
        args.last_m,
        args.batch_size,
        args.top,
        args.view_heads,
        args.seed,
    )
    return in_folder(args, "attribute", lambda m, t, out: run_attribute(m, t, cfg, out)[1])
