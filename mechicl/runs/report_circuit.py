"""Section "Circuit and findings" of `mechicl report`, and the report's own circuit stage.

**By default** the section holds (a) a small held-out path-patching run among the headline heads
(``circuit_stage``: every headline head as sender, at ``cfg.circuit_positions`` (all positions; --full adds the
label positions alone), into each later
headline head's q, k and v and straight into the logits; on ``n_circuit`` fresh contexts drawn from task rows that
none of the finder's draws used, so the heads are measured on contexts that never selected them), and (b) their
replication verdicts read from the committed per-cell grid results (``docs/results/grid/cells``).

**With ``--findings DIR`` / ``--circuit DIR``** it reads folders that `mechicl findings` and `mechicl circuit`
wrote instead (those commands cost minutes to hours: a grid of cells, selection and path patching over every
head). Every number shown is computed by this run or read from those folders' CSVs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from mechicl.analysis.engine.hooks import Head
from mechicl.analysis.heads.replication import Replication
from mechicl.analysis.patching.exact import Patcher
from mechicl.analysis.patching.paths import LOGITS, PathResult, path_patch
from mechicl.analysis.stats import mean_ci
from mechicl.data.batches import stage_draws
from mechicl.data.names import head_name, parse_head
from mechicl.data.pairs import make_pair
from mechicl.data.task import Task
from mechicl.errors import ConfigError
from mechicl.models.base import LoadedModel
from mechicl.runs.circuit import significant_edges
from mechicl.runs.folder import RunFolder, safe_name
from mechicl.runs.report_data import ReportConfig, ReportData, headline_heads
from mechicl.viz.circuit import circuit_figure
from mechicl.viz.report_html import Figure, Note, Section, Table
from mechicl.viz.table_words import ci_text

THRESHOLD = 0.05  # an edge of the circuit figure: |path effect| at least this, its 95% CI excluding 0


@dataclass(frozen=True)
class CircuitStage:
    """The report's held-out path patching among the headline heads (one ``PathResult`` per sender position set)."""

    heads: tuple[Head, ...]
    results: tuple[PathResult, ...]
    paths: pd.DataFrame  # PathResult.table() of each, concatenated: effect, ci_low, ci_high per path
    excluded_rows: int  # task rows left out because a finder draw used them
    example_ids: torch.Tensor  # [context, example] task rows of the contexts measured

    @property
    def names(self) -> list[str]:
        return [head_name(l, h) for l, h in self.heads]

    @property
    def n_contexts(self) -> int:
        return int(self.example_ids.shape[0])


def circuit_stage(
    loaded: LoadedModel, task: Task, cfg: ReportConfig, heads: list[str], excluded: set[int]
) -> CircuitStage:
    """Path patching (``analysis.patching.paths``, denoising, MLPs frozen) among ``heads`` on ``cfg.n_circuit``
    fresh contexts drawn outside ``excluded`` (every task row the finder's three draws used). Cost, per sender
    position set: one partial forward per sender layer, one per (receiver, input), on ``n_circuit`` contexts, plus
    the pair's two cached runs (gemma3-270m, three heads, 8 contexts: 18 forwards, 20 s on one thread)."""
    hs = tuple(sorted(parse_head(h) for h in heads))
    ids = stage_draws(task, {"circuit": cfg.n_circuit}, cfg.n_examples, seed=cfg.seed, exclude=excluded).ids
    pair = make_pair(task, loaded.tokenizer, ids["circuit"], n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    patcher = Patcher(loaded.model, pair)
    receivers = [h for h in hs if h[0] > hs[0][0]]
    results = tuple(path_patch(patcher, hs, receivers, p, "denoise", mlps="frozen") for p in cfg.circuit_positions)
    paths = pd.concat([r.table() for r in results], ignore_index=True)
    return CircuitStage(hs, results, paths, len(excluded), ids["circuit"])


def check_external(findings: str | None, circuit: str | None, model: str) -> None:
    """Fail before any forward when a folder given to ``--findings`` / ``--circuit`` cannot fill section 7."""
    if findings is not None:
        heads = Path(findings) / "summary" / "heads.csv"
        if not heads.is_file():
            raise ConfigError(
                f"--findings {findings}: no {heads}; give the --out folder of a finished "
                f"`mechicl findings` grid (its summary/ is rebuilt by `mechicl findings --summarise-only`)"
            )
    if circuit is not None:
        cfg = Path(circuit) / "config.json"
        if not (cfg.is_file() and (Path(circuit) / "paths.csv").is_file()):
            raise ConfigError(f"--circuit {circuit}: no config.json and paths.csv; give a `mechicl circuit` run folder")
        ran = json.loads(cfg.read_text()).get("model")
        if ran != model:
            raise ConfigError(
                f"--circuit {circuit} was run on {ran!r}, this report on {model!r}; run `mechicl circuit "
                f"--model {model}` and give its folder"
            )


def findings_blocks(folder: Path, model: str) -> list:
    """The grid's head verdicts for ``model`` and its layer x head effect map."""
    heads = pd.read_csv(folder / "summary" / "heads.csv")
    heads = heads[heads.model == model]
    cells = pd.read_csv(folder / "summary" / "cells.csv")
    cells = cells[cells.model == model]
    if not len(cells):
        return [
            Note(
                f"The findings grid in {folder} has no cell for {model}; run `mechicl findings --models {model} "
                f"--out {folder}` (it resumes).",
                pointer=True,
            )
        ]
    rep = heads.sort_values(["n_above_control", "effect_median"], ascending=False).head(8)
    table = rep[
        ["head", "verdict", "per_task", "effect_median", "effect_min", "effect_max", "control_mean_median"]
    ].copy()
    table.insert(2, "above control / cells", [f"{a}/{n}" for a, n in zip(rep.n_above_control, rep.n_cells)])
    n_eff = int(cells.has_effect.sum())
    repl = list(heads[heads.verdict == "replicates"]["head"])
    blocks: list = [
        Table(
            table.reset_index(drop=True),
            f"Findings grid ({folder}): {len(cells)} cells of {model} over tasks "
            f"{', '.join(dict.fromkeys(cells.task))}, {n_eff} with an in-context effect to attribute. "
            + (
                f"Heads that replicate (above matched controls in >= 2/3 of cells): {', '.join(repl)}."
                if repl
                else "No head replicates across cells."
            )
            + " Effects are shares of the correct-vs-flipped gap in P(true label) removed by ablation, "
            "validated on held-out contexts (docs/findings.md).",
        )
    ]
    png = folder / "summary" / f"effects_{safe_name(model)}.png"
    if png.is_file():
        blocks.append(
            Figure(
                png,
                "Screening effect of each head alone, per task (mean over seeds); outlined heads are "
                "above matched controls in a cell. Look for the same heads lighting up in every panel.",
            )
        )
    return blocks


def circuit_blocks(folder: Path) -> list:
    """The circuit figure(s) and the path effects whose CI excludes 0, above the run's own edge threshold."""
    threshold = float(json.loads((folder / "config.json").read_text()).get("threshold", 0.05))
    paths = pd.read_csv(folder / "paths.csv")
    sig = significant_edges(paths, threshold)  # the circuit figure's own edge rule
    n = int(paths.n_contexts.max()) if len(paths) else 0
    top = sig.reindex(sig.effect.abs().sort_values(ascending=False).index).head(10)
    blocks: list = [
        Table(
            top[["sender", "receiver", "input", "positions", "mlps", "effect", "ci_low", "ci_high"]]
            .rename(columns={"effect": "path_effect"})
            .reset_index(drop=True),
            f"Path patching ({folder}): of {len(paths)} sender -> receiver paths, {len(sig)} have "
            f"|effect| >= {threshold} with a 95% interval over {n} held-out contexts excluding 0"
            + (
                f"; the largest is {top.iloc[0].sender} -> {top.iloc[0].receiver} ({top.iloc[0].input}) "
                f"{top.iloc[0].effect:+.2f} [{top.iloc[0].ci_low:+.2f}, {top.iloc[0].ci_high:+.2f}]."
                if len(top)
                else ". The evidence does not support a circuit at this size."
            ),
        )
    ]
    for png in sorted(folder.glob("circuit_*.png")):
        blocks.append(
            Figure(
                png,
                f"Circuit ({png.stem}): heads as nodes, path effects above the threshold with a CI "
                "excluding 0 as edges (docs/circuit.md).",
            )
        )
    return blocks


def replication_blocks(rep: Replication | None, model: str, named: list[str]) -> list:
    """The headline heads' (and every replicating head's) verdicts from the committed grid cells."""
    if rep is None or not (rep.cells.model == model).any():
        return [
            Note(
                f"The committed grid has no cell of {model}: run `mechicl findings --models {model} --out "
                "runs/findings` (the replication grid over tasks and seeds), then re-run this report with "
                "`--findings runs/findings`.",
                pointer=True,
            )
        ]
    h = rep.heads[rep.heads.model == model]
    h = h[h["head"].isin(named) | (h.verdict == "replicates")].sort_values(
        ["n_above_control", "effect_median"], ascending=False
    )
    cells = rep.cells[rep.cells.model == model]
    table = pd.DataFrame(
        {
            "head": h["head"],
            "headline head here": h["head"].isin(named).map({True: "yes", False: "no"}),
            "verdict": h.verdict,
            "above controls / voting cells": [f"{a}/{n}" for a, n in zip(h.n_above_control, h.n_cells)],
            "role there": h.role.fillna("n/a"),
            "median effect there (share of the gap)": h.effect_median.map(lambda x: f"{x:+.2f}"),
            "per task": h.per_task,
        }
    )
    missing = [n for n in named if n not in set(h["head"])]
    return [
        Table(
            table.reset_index(drop=True),
            f"Replication, read from the committed per-cell results (docs/results/grid/cells: {len(cells)} cells of "
            f"{model} over {', '.join(dict.fromkeys(cells.task))}, {int(cells.votes.sum())} voting; `--findings DIR` "
            "reads a fresh grid instead). A head replicates when it is above its matched controls in at least 2/3 of "
            "the voting cells."
            + (
                f" Headline heads never validated in a voting grid cell: {', '.join(missing)} (this run's finder "
                "named them; the grid did not)."
                if missing
                else " Every headline head was validated in the grid too."
            ),
        )
    ]


def own_circuit_blocks(folder: RunFolder, c: CircuitStage, model: str) -> list:
    """The report's own held-out path patching: paths between headline heads with CIs, and the circuit figure."""
    p = c.paths
    shown = p.reindex(p.effect.abs().sort_values(ascending=False).index)
    sig = significant_edges(p, THRESHOLD)
    between = sig[sig.receiver != LOGITS]
    best = between.iloc[between.effect.abs().argmax()] if len(between) else None
    pngs = [folder.path / f"circuit_{r.positions}_{r.mlps}.png" for r in c.results]
    for r, png in zip(c.results, pngs):  # the circuit figure only (`mechicl circuit` also maps each input)
        circuit_figure(
            sig[(sig.positions == r.positions) & (sig.mlps == r.mlps)],
            c.names,
            [png],
            f"{model}: path effects from headline heads' outputs at {r.positions} positions (MLPs {r.mlps}), |effect| "
            f">= {THRESHOLD} with a 95% CI over {c.n_contexts} held-out contexts excluding 0",
        )
    lead = (
        f"the largest path between headline heads is {best.sender} -> {best.receiver} ({best.input}, sender at "
        f"{best.positions} positions) {ci_text(best.effect, best.ci_low, best.ci_high, signed=True)}"
        if best is not None
        else f"no path between headline heads reaches |effect| >= {THRESHOLD} with a CI excluding 0 at this size"
    )
    gap, lo, hi = mean_ci(c.results[0].context_gap.numpy(), items=c.example_ids.numpy())
    lead += (
        f". The normaliser, the correct - flipped logit difference at the query, is "
        f"{ci_text(gap, lo, hi, signed=True)} on these contexts; where it is small against its spread, path shares "
        "have wide CIs"
    )
    direct = sig[(sig.receiver == LOGITS) & (sig.positions == "all")]
    blocks: list = [
        Table(
            shown[["sender", "positions", "receiver", "input", "effect", "ci_low", "ci_high"]]
            .rename(columns={"positions": "sender positions", "input": "receiver input", "effect": "path effect"})
            .head(12)
            .reset_index(drop=True),
            f"Held-out path patching among the headline heads ({', '.join(c.names)}) on {c.n_contexts} fresh contexts "
            f"(task rows none of the finder's draws used; {c.excluded_rows} rows left out), correct -> flipped, MLPs "
            f"frozen: {lead}. Direct paths to the logits (sender at all positions) with a CI excluding 0: "
            + (
                "; ".join(
                    f"{r.sender} {ci_text(r.effect, r.ci_low, r.ci_high, signed=True)}" for r in direct.itertuples()
                )
                or "none"
            )
            + ". A path effect is the share of the full correct-vs-flipped logit difference that the sender's "
            "correct-label output restores through that route alone (`mechicl circuit` selects over every head).",
        )
    ]
    for png in pngs:
        blocks.append(
            Figure(
                png,
                f"Circuit ({png.stem}): headline heads as nodes; edges are paths with |effect| >= "
                f"{THRESHOLD} and a 95% CI over the {c.n_contexts} held-out contexts excluding 0.",
            )
        )
    return blocks


def circuit_section(folder: RunFolder, d: ReportData, rep: Replication | None, model: str) -> Section:
    """The section: replication (a given grid, else the committed cells) and paths (a given `mechicl circuit`
    folder, else the report's own held-out run among the headline heads)."""
    cfg, named = d.config, headline_heads(d.heads)
    blocks: list = findings_blocks(Path(cfg.findings), model) if cfg.findings else replication_blocks(rep, model, named)
    if cfg.circuit is not None:
        blocks += circuit_blocks(Path(cfg.circuit))
    elif d.circuit is not None:
        blocks += own_circuit_blocks(folder, d.circuit, model)
    else:
        blocks.append(
            Note(
                "No path patching: the finder validated no head on this model and task (section Validation), so "
                f"there are no headline heads to connect. `mechicl circuit --model {model} --task {cfg.task}` selects "
                "senders and receivers over every head.",
                pointer=True,
            )
        )
    return Section("Circuit and findings", tuple(blocks))
