"""`mechicl heads`: one cell of the held-out head finder (``analysis.heads.finder.find_label_heads``) on one
model and task, written as a `mechicl findings` cell is (screen, confirm, validate, sets, controls, summary.md)
plus layer x head maps of the screen. `mechicl findings` runs the same cell over a grid (``runs.findings``);
the report's Validation section reads the same result (``runs.report``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mechicl.analysis.heads.finder import FindingsConfig, FindingsResult, find_label_heads
from mechicl.analysis.heads.modes import FINDINGS_DEFAULT
from mechicl.data.batches import held_out_batches, stage_draws, used_rows
from mechicl.data.task import Task
from mechicl.models.base import LoadedModel
from mechicl.runs.command import in_folder
from mechicl.runs.findings_report import findings_markdown
from mechicl.runs.folder import RunFolder
from mechicl.viz.plots import head_map

TABLES = ("screen", "confirm", "validate", "sets", "controls")
ABLATION = FINDINGS_DEFAULT  # interchange: the finder mode that passed the ground-truth benchmark (docs/findings.md)


def preset_config(**sizes: Any) -> FindingsConfig:
    """`mechicl heads`' cell: ``FindingsConfig`` with the preset's ablation (``ABLATION``) and ``sizes``."""
    return FindingsConfig(**{"ablation": ABLATION, **sizes})


def find_heads_for(
    loaded: LoadedModel,
    task: Task,
    cfg: FindingsConfig,
    progress: bool = True,
    load: Callable[[int], Task] | None = None,
) -> FindingsResult:
    """Draw the three disjoint stages of ``task`` (seed ``cfg.seed``), render them and run the finder.

    ``load(seed)``: the task as another seed's cell loads it (for ``cfg.fresh_after``: built-in tasks are balanced
    per seed, so earlier seeds' rows are found by text). Cost: ``find_label_heads`` (see ``docs/findings.md``)."""
    if cfg.excluded_seeds and load is None:
        raise ValueError("fresh_after needs load(seed): the task as each excluded seed's cell loaded it")
    exclude = used_rows(task, cfg.discovery_sizes, cfg.k + 1, cfg.excluded_seeds, load)  # fresh rows, if asked
    draws = stage_draws(task, cfg.sizes, cfg.k + 1, seed=cfg.seed, exclude=exclude)
    batches = held_out_batches(task, loaded.tokenizer, draws, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    with tempfile.TemporaryDirectory(prefix="mechicl-kv-", dir=spill_dir()) as scratch:  # the KV caches off memory
        return find_label_heads(loaded.model, batches, cfg, progress=progress, spill=Path(scratch))


def spill_dir() -> str | None:
    """Where the finder's KV caches wait on disk: ``$MECHICL_SPILL``, else the system's temporary folder (where
    that is a tmpfs, the files stay in memory: set ``MECHICL_SPILL`` to a folder on disk)."""
    return os.environ.get("MECHICL_SPILL") or None


def write_cell_tables(result: FindingsResult, folder: RunFolder, model: str, task: str) -> None:
    """The cell's CSVs (``TABLES``) and its summary.md, as `mechicl findings` writes each cell."""
    for name in TABLES:
        folder.csv(f"{name}.csv", getattr(result, name))
    folder.text("summary.md", findings_markdown(result, model, task))


def write_heads(result: FindingsResult, out: Path | RunFolder, model: str, task: str) -> RunFolder:
    """``TABLES`` as CSVs, summary.md, and the screen's layer x head maps (when the cell had an effect)."""
    folder = out if isinstance(out, RunFolder) else RunFolder(out)
    write_cell_tables(result, folder, model, task)
    s = result.screen
    if len(s):
        title = f"{model} on {task}"
        what = f"{result.config.ablation} ablation of each head alone, screening draw"
        if "effect" in s.columns:
            head_map(folder, s, "effect", "screen_effect.png", f"{title}: share of the gap closed ({what})")
        head_map(folder, s, "effect_est", "screen_effect_est.png", f"{title}: first-order estimate ({what})")
    return folder


def command(args: argparse.Namespace) -> int:
    """`mechicl heads`: one cell of the held-out head finder (screen -> confirm -> validate against matched controls)."""
    cfg = preset_config(
        k=args.k,
        k_min=args.k // 2 if args.k_min is None else args.k_min,
        n_screen=args.n_screen,
        n_confirm=args.n_confirm,
        n_validate=args.n_eval,
        n_candidates=args.candidates,
        n_top=args.n_top,
        ablation=args.ablation,
        n_control=args.n_control,
        seed=args.seed,
    )

    def run(loaded: Any, task: Any, out: Path) -> str:
        result = find_heads_for(loaded, task, cfg)
        write_heads(result, out, loaded.name, task.name)
        return findings_markdown(result, loaded.name, task.name)

    return in_folder(args, "heads", run, config=cfg)
