"""`mechicl circuit`: where label information is written (label-position patching) and who reads it (path patching).

Held-out rule: the heads are chosen on one draw of contexts (``seed_select``) and every reported
number comes from a disjoint draw (``seed_eval``); path effects carry context-bootstrap intervals over those
contexts. Selection: receivers = the heads whose output at the query readout slot matters most
(``head_out_readout``), senders = the heads whose output at the label positions matters most
(``head_out_label``) in layers below the top receiver; models with at most ``all_heads_below``
heads use every head instead (the organisms).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mechicl.analysis.engine.hooks import Head, fmt_heads
from mechicl.analysis.patching.exact import Patcher
from mechicl.analysis.patching.paths import INPUTS, LOGITS, MLPS, PathResult, path_matrix, path_patch
from mechicl.analysis.patching.positions import (
    PARTS,
    POSITION_SETS,
    patch_head_parts,
    patch_position_sets,
    value_interval,
)
from mechicl.data.names import head_name, parse_heads
from mechicl.data.pairs import pair_for
from mechicl.data.task import Task
from mechicl.errors import ConfigError
from mechicl.runs.command import in_folder
from mechicl.runs.folder import Clock, RunFolder
from mechicl.runs.markdown import md_table
from mechicl.viz.paths import path_figures, resid_set_maps


@dataclass(frozen=True)
class CircuitConfig:
    """One ``mechicl circuit`` run. Cost: the selection sweeps (two head sweeps on ``n_select`` contexts),
    then on ``n_eval`` held-out contexts: residual-set patching (one forward per layer and direction),
    pattern/value patching (one forward per layer and part), path patching per position set."""

    model: str
    task: str
    n_examples: int = 9
    n_select: int = 8
    n_eval: int = 16
    seed_select: int = 0
    seed_eval: int = 1
    n_senders: int = 4
    n_receivers: int = 4
    positions: tuple[str, ...] = ("label", "all")
    threshold: float = 0.05
    all_heads_below: int = 16
    sender_heads: tuple[Head, ...] = ()  # pre-registered (e.g. from a findings grid): no selection draw is used
    receiver_heads: tuple[Head, ...] = ()

    def __post_init__(self) -> None:
        if not self.positions or any(p not in POSITION_SETS for p in self.positions):
            raise ConfigError(
                f"sender positions must be a list of {', '.join(POSITION_SETS)}, got {self.positions} "
                f"(--positions takes a comma list)"
            )
        if bool(self.sender_heads) != bool(self.receiver_heads):
            raise ConfigError("name both --sender-heads and --receiver-heads (pre-registered paths), or neither")
        if self.seed_eval == self.seed_select:
            raise ConfigError(
                "the held-out seed must differ from the selection seed (--seed-eval vs --seed): heads are "
                "chosen on one draw of contexts and measured on another"
            )


def select_heads(patcher: Patcher, cfg: CircuitConfig) -> tuple[list[Head], list[Head], pd.DataFrame]:
    """(senders, receivers, selection table) from the selection pair (see the module docstring)."""
    m = patcher.model.cfg
    every = [(l, h) for l in range(m.n_layers) for h in range(m.n_heads)]
    ro = patcher.sweep("head_out_readout", "denoise").table().rename(columns={"effect": "readout_effect"})
    lab = patcher.sweep("head_out_label", "denoise").table().rename(columns={"effect": "label_effect"})
    table = ro[["layer", "head", "readout_effect"]].merge(lab[["layer", "head", "label_effect"]], on=["layer", "head"])
    if len(every) <= cfg.all_heads_below:
        return [h for h in every if h[0] < m.n_layers - 1], [h for h in every if h[0] > 0], table
    rank = table.assign(a=table["readout_effect"].abs()).sort_values("a", ascending=False)
    receivers = [(int(r.layer), int(r.head)) for r in rank.head(cfg.n_receivers).itertuples()]
    top = max(l for l, _ in receivers)
    cand = table[table["layer"] < top].assign(a=lambda d: d["label_effect"].abs()).sort_values("a", ascending=False)
    senders = [(int(r.layer), int(r.head)) for r in cand.head(cfg.n_senders).itertuples()]
    return sorted(senders), sorted(receivers), table


def _with_ci(result: Any) -> pd.DataFrame:
    """A ``PatchResult`` table with the value's context-bootstrap interval (``patching.positions.value_interval``,
    widened for the task rows its contexts share)."""
    low, high = value_interval(result)
    return result.table().assign(ci_low=low.reshape(-1), ci_high=high.reshape(-1))


def significant_edges(paths: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Path effects with |effect| >= threshold whose interval excludes 0."""
    sig = (paths["ci_low"] > 0) | (paths["ci_high"] < 0)
    return paths[(paths["effect"].abs() >= threshold) & sig]


def run_circuit(loaded: Any, task: Task, cfg: CircuitConfig, out: Path) -> tuple[RunFolder, str]:
    """Select on one draw, measure on another, write tables, heatmaps, the circuit figure and ``summary.md``."""
    clock, folder = Clock(), RunFolder(out)
    folder.json("config.json", cfg)
    if cfg.sender_heads:  # pre-registered: measured as given, nothing selected here
        senders, receivers = list(cfg.sender_heads), list(cfg.receiver_heads)
    else:
        sel = Patcher(loaded.model, pair_for(loaded, task, cfg.n_select, cfg.n_examples, seed=cfg.seed_select))
        senders, receivers, selection = select_heads(sel, cfg)
        folder.csv("selection.csv", selection)
        clock.lap("selection")
    ev = Patcher(loaded.model, pair_for(loaded, task, cfg.n_eval, cfg.n_examples, seed=cfg.seed_eval))
    sets = pd.concat([patch_position_sets(ev, d).table() for d in ("denoise", "noise")])
    folder.csv("resid_sets.csv", sets)
    resid_set_maps(sets, folder.path, loaded.name)
    parts = pd.concat([_with_ci(r) for r in patch_head_parts(ev, PARTS, "denoise")])
    folder.csv("head_parts.csv", parts)
    clock.lap("label patching")
    results = [path_patch(ev, senders, receivers, p, "denoise", mlps=m) for p in cfg.positions for m in MLPS]
    paths = pd.concat([r.table() for r in results])
    folder.csv("paths.csv", paths)
    _draw_paths(folder, loaded.name, results, senders, receivers, cfg)
    clock.lap("path patching")
    text = summary(loaded.name, cfg, senders, receivers, sets, parts, paths, ev, clock)
    folder.text("summary.md", text)
    return folder, text


def _draw_paths(
    folder: RunFolder,
    name: str,
    results: list[PathResult],
    senders: list[Head],
    receivers: list[Head],
    cfg: CircuitConfig,
) -> None:
    """Per path-patching result: its sender x receiver maps per input and its circuit figure (edges above
    ``cfg.threshold`` whose interval excludes 0)."""
    nodes = [head_name(l, h) for l, h in sorted(set(senders) | set(receivers))]
    for r in results:
        mats = {inp: path_matrix(r, inp) for inp in (*INPUTS, LOGITS)}
        edges = significant_edges(r.table(), cfg.threshold)
        path_figures(
            mats,
            edges,
            nodes,
            folder.path,
            f"{r.positions}_{r.mlps}",
            name,
            r.positions,
            r.mlps,
            cfg.threshold,
            cfg.n_eval,
        )


def summary(
    name: str,
    cfg: CircuitConfig,
    senders: list[Head],
    receivers: list[Head],
    sets: pd.DataFrame,
    parts: pd.DataFrame,
    paths: pd.DataFrame,
    ev: Patcher,
    clock: Clock,
) -> str:
    """The run's ``summary.md``: tables of every measured number and how it was measured."""
    wide = sets.pivot_table(index=["direction", "layer"], columns="positions", values="value").reset_index()
    parts = parts.assign(
        cell=[f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in zip(parts["value"], parts["ci_low"], parts["ci_high"])]
    )
    pv = parts.pivot(index=["layer", "head"], columns="kind", values="cell").reset_index()
    pv = pv[[(int(l), int(h)) in set(senders) | set(receivers) for l, h in zip(pv["layer"], pv["head"])]]
    top = paths.assign(a=paths["effect"].abs()).sort_values("a", ascending=False).drop(columns="a").head(12)
    lines = [
        f"# Circuit: {name} on {cfg.task}",
        "",
        (
            "Heads pre-registered (--sender-heads / --receiver-heads, chosen elsewhere); every number below is "
            "measured on "
            if cfg.sender_heads
            else f"Heads chosen on {cfg.n_select} contexts (seed {cfg.seed_select}); every number below is measured on "
        )
        + f"{cfg.n_eval} other contexts (seed {cfg.seed_eval}), {cfg.n_examples} examples each (k = {cfg.n_examples - 1}). "
        f"Clean = correct labels, corrupted = all demonstration labels flipped; metric = answer - foil logit "
        f"difference at the query slot, normalised 0 = corrupted, 1 = clean (mean LD clean "
        f"{float(ev.baseline('clean').mean()):.3f}, corrupted {float(ev.baseline('corrupted').mean()):.3f}).",
        "",
        f"Senders: {fmt_heads(senders)}. Receivers: {fmt_heads(receivers)}.",
        "",
        "## Residual stream patched at all positions of a set, by layer",
        "",
        md_table(wide),
        "",
        "## Pattern vs value at the label positions (denoise; one head's z recomputed)",
        "",
        md_table(pv),
        "",
        "## Strongest paths (denoise; 95% context-bootstrap intervals)",
        "",
        md_table(top[["positions", "mlps", "sender", "receiver", "input", "effect", "ci_low", "ci_high"]]),
        "",
        "MLPs frozen: only the direct sender -> receiver path; recomputed: paths through MLPs count too.",
        "",
        clock.line(),
    ]
    return "\n".join(lines) + "\n"


def command(args: argparse.Namespace) -> int:
    """`mechicl circuit`: label-position patching and sender -> receiver path patching, held-out contexts."""
    cfg = CircuitConfig(
        args.model,
        args.task,
        args.k + 1,
        args.n_select,
        args.n_eval,
        args.seed,
        args.seed_eval,
        args.senders,
        args.receivers,
        tuple(p.strip() for p in args.positions.split(",")),
        args.threshold,
        sender_heads=tuple(parse_heads(args.sender_heads)) if args.sender_heads else (),
        receiver_heads=tuple(parse_heads(args.receiver_heads)) if args.receiver_heads else (),
    )
    return in_folder(args, "circuit", lambda m, t, out: run_circuit(m, t, cfg, out)[1])
