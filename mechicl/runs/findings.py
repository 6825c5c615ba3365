"""`mechicl findings`: the head finder over a grid of models x tasks x seeds, resumable, then replication.

Layout of ``out``::

    cells/<model>__<task>__seed<s>__<key>/   one finished cell (published atomically with manifest.json)
        cell.json  screen.csv  confirm.csv  validate.csv  sets.csv  controls.csv  summary.md
    summary/                          regenerated from every finished cell on each run
        cells.csv  heads.csv  task_agreement.csv  effect_maps.csv  effects_<model>.png  summary.md

A cell is keyed by its inputs' contents and its configuration (``findings_grid.cell_key``: a model or task
file's sha256), so an edited CSV or another ``k`` is a new cell. A finished cell is skipped once its files match
its manifest (an edited or damaged one stops the grid before any compute, or is re-run with
``rerun_damaged``), so a killed grid resumes where it stopped (a crash loses one cell). Everything that needs
no model is checked before the first cell (``findings_grid.check_grid``), and one run holds a grid at a time. Cells run serially in this process by default (each model loaded once), or through any
``concurrent.futures.Executor`` (``run_grid(executor=...)``): each worker loads its model once and
runs all its cells.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import tomllib
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from mechicl.analysis.heads.finder import FindingsConfig, FindingsResult
from mechicl.analysis.heads.replication import CellTables, Replication, replicate
from mechicl.data.task import check_tokenization
from mechicl.data.tasks import load_task
from mechicl.errors import ConfigError, MechiclError
from mechicl.models.device import release_host_memory
from mechicl.models.loading import load_model
from mechicl.models.machine import peak_rss_gb
from mechicl.runs.findings_grid import (
    RERUN_HINT,
    cell_key,
    check_grid,
    check_toml,
    damaged_cells,
    damaged_message,
    grid_lock,
    known_config_keys,
    safe_part,
)
from mechicl.runs.findings_report import write_summary
from mechicl.runs.folder import RunFolder, check_out, staged
from mechicl.runs.heads import TABLES as TABLES  # the cell's CSVs (tests read them from here)
from mechicl.runs.heads import find_heads_for, write_cell_tables


@dataclass(frozen=True)
class Cell:
    """One model x task x seed; ``key`` (``findings_grid.cell_key``, set by ``GridSpec.cells``) hashes its inputs'
    contents and configuration."""

    model: str
    task: str
    seed: int
    key: str = ""

    @property
    def slug(self) -> str:
        """The cell's folder name under ``out/cells``: path-safe parts (never a separator or a leading dot), the key."""
        key = f"__{self.key}" if self.key else ""
        return f"{safe_part(self.model)}__{safe_part(self.task)}__seed{self.seed}{key}"


@dataclass(frozen=True)
class GridSpec:
    """Models x tasks x seeds, and the per-cell ``FindingsConfig`` (its ``seed`` is set per cell)."""

    models: tuple[str, ...] = ("gemma3-270m", "smollm2-135m")
    tasks: tuple[str, ...] = ("vader-words", "vader-movies", "vader-tweets", "vader-nyt", "vader-amazon", "vega-cars")
    seeds: tuple[int, ...] = (0, 1, 2)
    config: FindingsConfig = field(default_factory=FindingsConfig)
    task_config: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-task overrides, e.g. a smaller k

    def cells(self) -> list[Cell]:
        """Every cell, keyed (hashes the model and task files: remembered per file within the process)."""
        cells = [Cell(m, t, s) for m in self.models for t in self.tasks for s in self.seeds]
        return [replace(c, key=cell_key(c.model, c.task, self.cell_config(c))) for c in cells]

    def cell_config(self, cell: Cell) -> FindingsConfig:
        """The cell's configuration: the grid's, the task's overrides, the cell's seed."""
        return FindingsConfig(**{**asdict(self.config), **self.task_config.get(cell.task, {}), "seed": cell.seed})


def load_grid(path: Path | str | None, **overrides: Any) -> GridSpec:
    """A grid from TOML (``models``, ``tasks``, ``seeds`` lists; a ``[config]`` table of FindingsConfig
    fields), or the default grid (``path=None``); ``overrides`` that are not None replace its values."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read grid config {path}: {e}") from e
    known = known_config_keys()
    cfg = raw.pop("config", {})
    per_task = raw.pop("task_config", {})
    check_toml({**raw, "config": cfg, "task_config": per_task}, path)  # types first: the checks below need tables
    bad = (
        (set(cfg) - known)
        | (set(raw) - {"models", "tasks", "seeds"})
        | {k for o in per_task.values() for k in o} - known
    )
    if bad:
        raise ConfigError(
            f"unknown keys in {path}: {sorted(bad)}; grid keys are models, tasks, seeds and [config] "
            f"with {sorted(known)}"
        )
    spec = {k: tuple(v) for k, v in raw.items()}
    cfg = {**{k: v for k, v in asdict(FindingsConfig()).items() if k in known}, **cfg}
    spec.update({k: tuple(v) for k, v in overrides.items() if v is not None and k in ("models", "tasks", "seeds")})
    cfg.update({k: v for k, v in overrides.items() if v is not None and k in known})
    return GridSpec(**spec, config=FindingsConfig(**cfg), task_config=per_task)


def run_cell(loaded: Any, cell: Cell, cfg: FindingsConfig, out: Path, progress: bool = True) -> Path:
    """Run one cell (``cfg`` is its own: ``GridSpec.cell_config``) and publish ``out/cells/<slug>`` atomically.
    Cost: ``find_label_heads``."""
    task = load_task(cell.task, seed=cell.seed)
    command = ["mechicl", "findings", "cell", cell.model, cell.task, str(cell.seed)]
    with staged(out / "cells" / cell.slug, command=command, config=cfg) as tmp:  # locked from here: one writer
        result = find_heads_for(loaded, task, cfg, progress=progress, load=lambda s: load_task(cell.task, seed=s))
        write_cell(result, cell, RunFolder(tmp))
    del result
    release_host_memory()  # the next cell starts from the model's footprint, not this cell's high-water mark
    return out / "cells" / cell.slug


def write_cell(result: FindingsResult, cell: Cell, folder: RunFolder) -> None:
    folder.json(
        "cell.json",
        {
            **asdict(cell),
            "verdict": result.verdict,
            "has_effect": result.has_effect,
            "baseline": result.baseline,
            "stage_seeds": result.stage_seeds,
            "timings": result.timings,
            "peak_rss_gb": peak_rss_gb(),  # the process's peak so far: this cell's own in a fresh worker process
            "config": asdict(result.config),
        },
    )
    write_cell_tables(result, folder, cell.model, cell.task)


def run_cells(model: str, cells: list[Cell], spec: GridSpec, out: Path, progress: bool = False) -> list[str]:
    """A worker: load ``model`` once (one torch thread) and run ``cells``; returns the finished slugs."""
    torch.set_num_threads(1)
    loaded = _load_for(model, cells)
    return [run_cell(loaded, c, spec.cell_config(c), out, progress=progress).name for c in cells]


def _load_for(model: str, cells: list[Cell]) -> Any:
    """Load ``model`` and check that its tokenizer reads every task of ``cells``, before the first of them runs."""
    loaded = load_model(model)
    for task in dict.fromkeys(c.task for c in cells):
        check_tokenization(load_task(task, seed=cells[0].seed), loaded.tokenizer)
    return loaded


def finished(out: Path) -> set[str]:
    """Slugs of the cells published under ``out/cells`` (a folder with a manifest)."""
    return {p.name for p in (out / "cells").glob("*") if (p / "manifest.json").is_file()}


def run_grid(
    spec: GridSpec,
    out: Path | str,
    *,
    executor: Any = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
    rerun_damaged: bool = False,
) -> Replication:
    """Run every unfinished cell of ``spec`` (serially, or on ``executor``), then summarise all finished ones.

    Before the first cell: ``check_grid`` (``--out``, models, tasks, draws), the grid's lock, and every finished
    cell against its manifest (``ConfigError`` for an edited or damaged one, unless ``rerun_damaged``: then it is
    removed and re-run). ``executor``: anything with ``submit(fn, *args)`` returning an object with ``result()``
    (a ``concurrent.futures`` executor, ``distributed.Client.get_executor()``, a ``submitit`` executor), one job
    per cell: a free worker takes the next cell, so cells of unequal cost balance themselves, and each job loads
    its model (gemma3-270m: 5 s against 1-4 min a cell; ``docs/findings.md``, "Cost"). ``make_executor``'s local
    pool gives every cell a fresh process, so no cell starts on the heap a previous one left behind.
    """
    out = check_grid(spec, out)
    with grid_lock(out):
        todo = _plan(spec, out, rerun_damaged, say)
        by_model: dict[str, list[Cell]] = {}
        for c in todo:
            by_model.setdefault(c.model, []).append(c)
        bar = tqdm(total=len(todo), desc="findings cells", unit="cell", disable=not progress)
        if executor is None:
            for model, cells in by_model.items():
                loaded = _load_for(model, cells)
                for c in cells:
                    bar.set_postfix_str(c.slug)
                    run_cell(loaded, c, spec.cell_config(c), out, progress=False)
                    bar.update()
        else:
            jobs = [(executor.submit(run_cells, c.model, [c], spec, out), c) for c in todo]
            for job, c in jobs:  # in submission order: submitit jobs are not concurrent.futures futures
                job.result()
                bar.set_postfix_str(c.slug)
                bar.update()
        bar.close()
        return _summarise(out, spec)


def _plan(spec: GridSpec, out: Path, rerun_damaged: bool, say: Callable[[str], None]) -> list[Cell]:
    """The cells to run: every cell of ``spec`` not finished, or damaged when ``rerun_damaged`` (its folder removed)."""
    cells = spec.cells()
    bad = damaged_cells(out, [c.slug for c in cells])
    if bad and not rerun_damaged:
        raise ConfigError(damaged_message(out, bad))
    for slug in bad:
        shutil.rmtree(out / "cells" / slug)
    done = finished(out)
    todo = [c for c in cells if c.slug not in done]
    other = len(done - {c.slug for c in cells})
    say(
        f"[mechicl] findings grid: {len(cells)} cells, {len(cells) - len(todo)} already finished, "
        f"{len(todo)} to run{f' ({len(bad)} damaged, re-run)' if bad else ''} -> {out}"
        + (f"; {other} finished cell(s) of other inputs or settings stay in cells/, not summarised" if other else "")
    )
    return todo


def make_executor(
    workers: int = 1, scheduler: str | None = None, slurm: dict[str, Any] | None = None, log_dir: Path | None = None
) -> tuple[Any, int]:
    """An existing engine for the grid's cells, and how many cells it runs at once.

    ``scheduler`` (``tcp://host:port``): a Dask ``distributed`` cluster; ``slurm``: ``submitit``
    executor parameters (e.g. ``{"slurm_partition": "gpu", "timeout_min": 60}``); otherwise ``workers``
    local processes (one torch thread each, a fresh process per cell: ``max_tasks_per_child=1``), or ``None``
    (serial, in this process) for ``workers == 1``.
    Dask and submitit come with ``pip install mechicl[distributed]``.
    """
    if scheduler and slurm:
        raise ConfigError("pass either --scheduler (Dask) or --slurm options, not both")
    if scheduler or slurm:
        try:
            if scheduler:  # optional engines: imported only when asked for (mechicl[distributed])
                from distributed import Client

                client = Client(scheduler)
                return client.get_executor(), max(1, len(client.scheduler_info()["workers"]))
            import submitit

            ex = submitit.AutoExecutor(folder=str(log_dir or Path("submitit_logs")))
            ex.update_parameters(**(slurm or {}))
            return ex, max(1, workers)
        except ImportError as e:
            raise ConfigError(f"{e.name} is not installed: pip install 'mechicl[distributed]'") from e
    if workers <= 1:
        return None, 1
    spawn = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=spawn, max_tasks_per_child=1), workers


READ_COLUMNS = {"screen": {"layer", "head"}, "validate": {"layer", "head", "effect", "above_control"}, "sets": {"test"}}


def read_cell(folder: Path) -> CellTables:
    """A finished cell's tables (``cell.json`` and CSVs) as ``CellTables``; ``ConfigError`` naming a damaged file."""
    try:
        meta = json.loads((folder / "cell.json").read_text(encoding="utf-8"))

        def table(name: str) -> pd.DataFrame:
            p = folder / f"{name}.csv"
            if not (p.is_file() and p.stat().st_size > 1):
                return pd.DataFrame()  # an empty table (written as one newline)
            df = pd.read_csv(p)
            if not READ_COLUMNS[name] <= set(df.columns):  # e.g. a truncated header
                raise ValueError(f"{name}.csv lacks the columns {sorted(READ_COLUMNS[name] - set(df.columns))}")
            return df

        return CellTables(
            meta["model"],
            meta["task"],
            int(meta["seed"]),
            bool(meta["has_effect"]),
            meta["baseline"],
            table("screen"),
            table("validate"),
            table("sets"),
            float(sum(meta["timings"].values())),
            bool(meta.get("config", {}).get("heads")),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pd.errors.ParserError) as e:
        raise ConfigError(
            f"cannot read the finished cell {folder}: {type(e).__name__}: {e}; the cell is damaged: {RERUN_HINT}"
        ) from e


def summarise(out: Path | str, spec: GridSpec | None = None) -> Replication:
    """Replication over every finished cell under ``out`` (those of ``spec`` only, when given); writes ``out/summary``.
    Holds the grid's lock; a damaged cell raises ``ConfigError`` and removes the old ``summary/``."""
    out = check_out(out, overwrite=True)
    with grid_lock(out):
        return _summarise(out, spec)


def _summarise(out: Path, spec: GridSpec | None) -> Replication:
    names = finished(out)
    if spec is not None:
        want = {c.slug for c in spec.cells()}
        if not names & want:
            raise ConfigError(
                f"none of the grid's {len(want)} cells is finished in {out} (it holds {len(names)} finished "
                f"cell(s){': ' + ', '.join(sorted(names)[:4]) if names else ''}); pass the --config, models, tasks, "
                f"seeds and settings the grid ran with, or run the grid without --summarise-only"
            )
        if want - names:
            warnings.warn(f"summarising {len(names & want)} of the grid's {len(want)} cells", stacklevel=2)
        names &= want
    try:
        bad = damaged_cells(out, sorted(names))
        if bad:
            raise ConfigError(damaged_message(out, bad))
        cells = [read_cell(out / "cells" / n) for n in sorted(names)]
    except MechiclError as e:  # the old summary no longer describes these cells: do not leave it as if current
        if (out / "summary").exists():
            shutil.rmtree(out / "summary")
            raise ConfigError(f"{e} (the old {out}/summary was removed: it no longer matched the cells)") from e
        raise
    rep = replicate(cells)
    with staged(
        out / "summary",
        overwrite=True,
        command=["mechicl", "findings", "summarise", str(out)],
        config=None if spec is None else spec,
    ) as tmp:
        write_summary(rep, RunFolder(tmp), spec)
    return rep


FINDINGS_KEYS = (  # the finder's flags that override the grid config's [config] values
    "k",
    "k_min",
    "n_screen",
    "n_confirm",
    "n_validate",
    "n_candidates",
    "n_top",
    "ablation",
    "n_resample",
    "control",
    "n_control",
    "screen",
    "heads",
    "fresh_after",
)


def command(args: argparse.Namespace) -> int:
    """`mechicl findings`: the head finder over a grid of models x tasks x seeds; resumable; replication summary."""
    over = {k: getattr(args, k) for k in FINDINGS_KEYS} | {
        "models": args.models,
        "tasks": args.tasks,
        "seeds": args.seeds,
    }
    spec = load_grid(args.config, **over)
    if args.summarise_only:
        summarise(args.out, spec)
    else:
        torch.set_num_threads(args.threads)
        slurm = dict(kv.split("=", 1) for kv in args.slurm.split(",")) if args.slurm else None
        executor, n = make_executor(args.workers, args.scheduler, slurm, args.out / "submitit")
        if executor is not None:
            print(f"[mechicl] {n} cells at a time, one job (and one model load) per cell", flush=True)
        run_grid(spec, args.out, executor=executor, rerun_damaged=args.rerun_damaged)
    print((args.out / "summary" / "summary.md").read_text(encoding="utf-8"))
    print(f"[mechicl] wrote {args.out}/summary (cells in {args.out}/cells)")
    return 0
