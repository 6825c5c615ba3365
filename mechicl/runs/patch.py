"""`mechicl patch`: exact activation-patching sweeps between correct- and flipped-label contexts."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mechicl.analysis.patching.exact import Patcher, PatchResult
from mechicl.analysis.patching.kinds import KINDS
from mechicl.data.pairs import pair_for
from mechicl.data.task import Task
from mechicl.errors import ConfigError
from mechicl.models.base import LoadedModel
from mechicl.runs.command import in_folder
from mechicl.runs.folder import RunFolder
from mechicl.runs.markdown import md_table
from mechicl.viz.patching import effect_map


@dataclass(frozen=True)
class PatchRunConfig:
    """One `mechicl patch` run. ``n_examples``: examples per context, the last is the query (``--k`` = n_examples - 1
    observed demonstrations); ``batch_size``: rows per batched forward (``Patcher``'s ``max_rows``).

    Cost: per sweep, ``PatchResult.forwards`` receiver-forward equivalents (see ``analysis.patching.exact``).
    """

    model: str
    task: str
    kinds: tuple[str, ...] = ("resid", "head_out")
    directions: tuple[str, ...] = ("denoise", "noise")
    n_contexts: int = 4
    n_examples: int = 8
    last_m: int | None = None
    batch_size: int = 64
    top: int = 5
    seed: int = 0


EFFECT_MEANING = {
    "denoise": "effect = patched value (0 = corrupted run, 1 = clean restored)",
    "noise": "effect = patched value - 1 (0 = clean run unchanged, -1 = corrupted answer)",
}


def write_patch_results(
    folder: RunFolder, results: Sequence[PatchResult], title: str = "", query_pos: Sequence[int] = ()
) -> None:
    """``<kind>_<direction>.csv`` and ``.png`` per result plus ``patching.csv`` (all rows). Each heatmap draws the
    table's ``effect`` column; position heatmaps mark ``query_pos`` (the query readout slot of each context)."""
    tables = []
    for r in results:
        stem = f"{r.kind}_{r.direction}"
        t = r.table()
        tables.append(t)
        folder.csv(f"{stem}.csv", t)
        ticks = [f"{p}:{role[:3]}" for p, role in enumerate(r.pos_roles)] if r.pos_roles else None
        title_ = f"{title}: {r.kind} ({r.description}), {r.direction}; {EFFECT_MEANING[r.direction]}"
        effect_map(r.effect.detach().float().numpy(), folder / f"{stem}.png", title_, r.axes, ticks, query_pos)
    if tables:
        folder.csv("patching.csv", pd.concat(tables, ignore_index=True))


def summary(results: Sequence[PatchResult], patcher: Patcher, cfg: PatchRunConfig, title: str) -> str:
    """The top cells of each sweep, with its cost."""
    rows = []
    for r in results:
        t = r.table()
        t = t.reindex(t.effect.abs().sort_values(ascending=False).index).head(cfg.top)
        cells = ", ".join(
            f"L{int(row[r.axes[0]])}{r.axes[1][0].upper()}{int(row[r.axes[1]])} ({row.effect:+.3f})"
            for _, row in t.iterrows()
        )
        rows.append(
            {
                "sweep": r.kind,
                "direction": r.direction,
                "top cells (effect)": cells,
                "seconds": f"{r.seconds:.1f}",
                "forward-equivalents": f"{r.forwards:.1f}",
            }
        )
    lines = [
        f"# Activation patching: {title}",
        "",
        f"{cfg.n_contexts} contexts x (k = {cfg.n_examples - 1} demonstrations + 1 query), {patcher.pair.description}, "
        f"seed {cfg.seed}. "
        f"Normalised logit difference at the query readout slot: 0 = corrupted run, 1 = clean run; effect = "
        f"value (denoise) or value - 1 (noise), the number each heatmap draws. Cells: LxHy = layer x head y, "
        f"LxPp = layer x position p, LxKk = layer x key-value head k. "
        f"Mean LD clean {float(patcher.baseline('clean').mean()):.3f}, corrupted "
        f"{float(patcher.baseline('corrupted').mean()):.3f}.",
        "",
        md_table(pd.DataFrame(rows)),
    ]
    return "\n".join(lines) + "\n"


def run_patch(loaded: LoadedModel, task: Task, cfg: PatchRunConfig, out: Path) -> tuple[RunFolder, str]:
    """Build the pair, run every (kind, direction) sweep, write the folder; returns it and the summary."""
    pair = pair_for(loaded, task, cfg.n_contexts, cfg.n_examples, seed=cfg.seed, last_m=cfg.last_m)
    patcher = Patcher(loaded.model, pair, max_rows=cfg.batch_size, progress=True)
    results = [patcher.sweep(k, d) for k in cfg.kinds for d in cfg.directions]
    folder = RunFolder(out)
    title = f"{loaded.name} on {task.name}"
    write_patch_results(folder, results, title, [int(p) for p in pair.query_pos])
    text = summary(results, patcher, cfg, title)
    folder.text("summary.md", text)
    folder.json("config.json", cfg)
    return folder, text


def command(args: argparse.Namespace) -> int:
    """`mechicl patch`: exact activation-patching sweeps, correct- vs flipped-label contexts."""
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConfigError(f"unknown sweep kind(s) {bad}; --kinds takes a comma list of {', '.join(KINDS)}")
    directions = ("denoise", "noise") if args.direction == "both" else (args.direction,)
    cfg = PatchRunConfig(
        args.model,
        args.task,
        tuple(kinds),
        directions,
        args.n_contexts,
        args.k + 1,
        args.last_m,
        args.batch_size,
        args.top,
        args.seed,
    )
    return in_folder(args, "patch", lambda m, t, out: run_patch(m, t, cfg, out)[1])
