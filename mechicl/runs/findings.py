"""`mechicl findings`: the head finder over a grid of models x tasks x seeds, resumable, then replication.

Layout of ``out``::

    cells/<model>__<task>__seed<s>/   one finished cell (published atomically with manifest.json)
        cell.json  screen.csv  confirm.csv  validate.csv  sets.csv  controls.csv  summary.md
    summary/                          regenerated from every finished cell on each run
        cells.csv  heads.csv  task_agreement.csv  effect_maps.csv  effects_<model>.png  summary.md

A cell whose folder exists is skipped, so a killed grid resumes where it stopped (a crash loses
one cell). Cells run serially in this process by default (each model loaded once), or through any
``concurrent.futures.Executor`` (``run_grid(executor=...)``): each worker loads its model once and
runs all its cells.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import tomllib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from mechicl.analysis.heads.finder import FindingsConfig, FindingsResult, find_label_heads
from mechicl.analysis.heads.replication import CellTables, Replication, replicate
from mechicl.data.batches import held_out_batches, stage_draws
from mechicl.data.tasks import load_task
from mechicl.errors import ConfigError
from mechicl.models.device import release_host_memory
from mechicl.models.loading import load_model
from mechicl.runs.findings_report import findings_markdown, write_summary
from mechicl.runs.folder import RunFolder, staged

TABLES = ("screen", "confirm", "validate", "sets", "controls")


@dataclass(frozen=True)
class Cell:
    model: str
    task: str
    seed: int

    @property
    def slug(self) -> str:
        p = Path(self.task)
        task = (
            self.task
            if p.suffix not in (".csv", ".jsonl")
            else f"{p.stem}-{hashlib.sha1(self.task.encode()).hexdigest()[:6]}"
        )
        return f"{self.model}__{task.replace('/', '_').replace(':', '_')}__seed{self.seed}"


@dataclass(frozen=True)
class GridSpec:
    """Models x tasks x seeds, and the per-cell ``FindingsConfig`` (its ``seed`` is set per cell)."""

    models: tuple[str, ...] = ("gemma3-270m", "smollm2-135m")
    tasks: tuple[str, ...] = ("vader-words", "vader-movies", "vader-tweets", "vader-nyt", "vader-amazon", "vega-cars")
    seeds: tuple[int, ...] = (0, 1, 2)
    config: FindingsConfig = field(default_factory=FindingsConfig)
    task_config: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-task overrides, e.g. a smaller k

    def cells(self) -> list[Cell]:
        return [Cell(m, t, s) for m in self.models for t in self.tasks for s in self.seeds]

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
    known = {f.name for f in fields(FindingsConfig)} - {"seed"}
    cfg = raw.pop("config", {})
    per_task = raw.pop("task_config", {})
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
    draws = stage_draws(task, cfg.sizes, cfg.k + 1, seed=cell.seed)
    batches = held_out_batches(task, loaded.tokenizer, draws, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    result = find_label_heads(loaded.model, batches, cfg, progress=progress)
    dest = out / "cells" / cell.slug
    with staged(
        dest, command=["mechicl", "findings", "cell", cell.model, cell.task, str(cell.seed)], config=cfg
    ) as tmp:
        write_cell(result, cell, RunFolder(tmp))
    del result, batches
    release_host_memory()  # the next cell starts from the model's footprint, not this cell's high-water mark
    return dest


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
            "config": asdict(result.config),
        },
    )
    for name in TABLES:
        folder.csv(f"{name}.csv", getattr(result, name))
    folder.text("summary.md", findings_markdown(result, cell.model, cell.task))


def run_cells(model: str, cells: list[Cell], spec: GridSpec, out: Path, progress: bool = False) -> list[str]:
    """A worker: load ``model`` once (one torch thread) and run ``cells``; returns the finished slugs."""
    torch.set_num_threads(1)
    loaded = load_model(model)
    return [run_cell(loaded, c, spec.cell_config(c), out, progress=progress).name for c in cells]


def finished(out: Path) -> set[str]:
    """Slugs of the cells published under ``out/cells`` (a folder with a manifest)."""
    return {p.name for p in (out / "cells").glob("*") if (p / "manifest.json").is_file()}


def run_grid(
    spec: GridSpec,
    out: Path | str,
    *,
    executor: Any = None,
    n_workers: int = 1,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> Replication:
    """Run every unfinished cell of ``spec`` (serially, or on ``executor``), then summarise all finished ones.

    ``executor``: anything with ``submit(fn, *args)`` returning an object with ``result()`` (a
    ``concurrent.futures`` executor, ``distributed.Client.get_executor()``, a ``submitit`` executor);
    each model's cells are split into ``n_workers`` jobs, and each job loads its model once.
    """
    out = Path(out)
    _check_finished(spec, out)
    todo = [c for c in spec.cells() if c.slug not in finished(out)]
    say(
        f"[mechicl] findings grid: {len(spec.cells())} cells, {len(spec.cells()) - len(todo)} already finished, "
        f"{len(todo)} to run -> {out}"
    )
    by_model: dict[str, list[Cell]] = {}
    for c in todo:
        by_model.setdefault(c.model, []).append(c)
    bar = tqdm(total=len(todo), desc="findings cells", unit="cell", disable=not progress)
    if executor is None:
        for model, cells in by_model.items():
            loaded = load_model(model)
            for c in cells:
                bar.set_postfix_str(c.slug)
                run_cell(loaded, c, spec.cell_config(c), out, progress=False)
                bar.update()
    else:
        jobs = [
            (executor.submit(run_cells, m, cells[i::n_workers], spec, out), len(cells[i::n_workers]))
            for m, cells in by_model.items()
            for i in range(min(n_workers, len(cells)))
        ]
        for job, n in jobs:  # in submission order: submitit jobs are not concurrent.futures futures
            job.result()
            bar.update(n)
    bar.close()
    return summarise(out, spec)


def _check_finished(spec: GridSpec, out: Path) -> None:
    """Refuse to reuse a finished cell that ran with another configuration (a resumed grid must be one grid)."""
    for c in spec.cells():
        want = {k: v for k, v in asdict(spec.cell_config(c)).items() if k != "seed"}
        meta = out / "cells" / c.slug / "cell.json"
        if c.slug in finished(out) and meta.is_file():
            had = {k: v for k, v in json.loads(meta.read_text(encoding="utf-8"))["config"].items() if k != "seed"}
            if had != want:
                diff = {k: (had.get(k), v) for k, v in want.items() if had.get(k) != v}
                raise ConfigError(
                    f"{out}/cells/{c.slug} was run with another configuration ({diff}, as (had, asked)); "
                    f"pass another --out, or delete that cell to rerun it"
                )


def make_executor(
    workers: int = 1, scheduler: str | None = None, slurm: dict[str, Any] | None = None, log_dir: Path | None = None
) -> tuple[Any, int]:
    """An existing engine for the grid's cells, and how many jobs to split each model's cells into.

    ``scheduler`` (``tcp://host:port``): a Dask ``distributed`` cluster; ``slurm``: ``submitit``
    executor parameters (e.g. ``{"slurm_partition": "gpu", "timeout_min": 60}``); otherwise ``workers``
    local processes (one torch thread each), or ``None`` (serial, in this process) for ``workers == 1``.
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
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")), workers


def read_cell(folder: Path) -> CellTables:
    """A finished cell's tables (``cell.json`` and CSVs) as ``CellTables``."""
    meta = json.loads((folder / "cell.json").read_text(encoding="utf-8"))

    def table(name: str) -> pd.DataFrame:
        p = folder / f"{name}.csv"
        return pd.read_csv(p) if p.is_file() and p.stat().st_size > 1 else pd.DataFrame()

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
    )


def summarise(out: Path, spec: GridSpec | None = None) -> Replication:
    """Replication over every finished cell under ``out`` (those of ``spec`` only, when given); writes ``out/summary``."""
    names = finished(out) if spec is None else finished(out) & {c.slug for c in spec.cells()}
    cells = [read_cell(out / "cells" / n) for n in sorted(names)]
    rep = replicate(cells)
    with staged(
        out / "summary",
        overwrite=True,
        command=["mechicl", "findings", "summarise", str(out)],
        config=None if spec is None else spec,
    ) as tmp:
        write_summary(rep, RunFolder(tmp), spec)
    return rep
