"""What `mechicl findings` checks before its first cell, and what makes a cell the same cell.

- ``check_toml``: the grid TOML's types and ranges (``models``/``tasks`` non-empty lists of names,
  ``seeds`` integers >= 0, ``[config]`` / ``[task_config.<task>]`` values of ``FindingsConfig``'s types).
- ``check_grid``: ``--out`` (a folder that can be written), every model name or path, every task (loaded:
  a bad file fails here) and every cell's draws (a task too small for its ``k`` fails here).
- Cell identity: a cell's folder is named ``<model>__<task>__seed<s>__<key>`` with path-safe parts, always
  directly under ``out/cells``; ``key`` hashes the model's and the task's *contents* (``input_id``: a model
  file's or a task file's sha256; a registered name as itself) and the cell's whole configuration, so an
  edited CSV or another ``k`` is another cell.
- ``damaged_cells``: finished cells whose files no longer match their ``manifest.json`` (``verify_manifest``);
  ``grid_lock``: one ``findings`` run per grid folder at a time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from mechicl.analysis.heads.finder import FindingsConfig
from mechicl.data.batches import stage_draws
from mechicl.data.tasks import known_tasks, load_task
from mechicl.errors import ConfigError
from mechicl.models.loading import check_model_name
from mechicl.models.registry import EMBEDDED, ORGANISMS, TINY_MODELS
from mechicl.runs.folder import check_out, exclusive, safe_name, verify_manifest

# the smallest value of each integer FindingsConfig field (the CLI flags' bounds)
INT_MIN = {"k": 1, "k_min": 0, "n_screen": 4, "n_confirm": 4, "n_validate": 4, "n_candidates": 1, "n_top": 1}
INT_MIN |= {"n_resample": 1, "n_control": 1, "n_boot": 1, "n_perm": 1}
RERUN_HINT = "re-run them with `mechicl findings` and the same grid flags plus --rerun-damaged"


def _names(value: Any, key: str, path: Any) -> None:
    ok = isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value)
    if not ok:
        raise ConfigError(f'{path}: {key} must be a non-empty list of names, e.g. {key} = ["toy"]; got {value!r}')
    if len(set(value)) != len(value):
        raise ConfigError(f"{path}: {key} lists a name twice ({value}); list each once")


def _config_values(cfg: Any, where: str) -> None:
    """``cfg``: a table of FindingsConfig fields, each of the default's type (integers within ``INT_MIN``)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where} must be a table of settings, e.g. [config] then k = 8; got {cfg!r}")
    default = FindingsConfig()
    for key, v in cfg.items():
        if key not in known_config_keys():
            continue  # reported with the other unknown keys by load_grid
        want = type(getattr(default, key))
        if want is int and (type(v) is not int or v < INT_MIN.get(key, 0)):
            raise ConfigError(f"{where}: {key} must be an integer >= {INT_MIN.get(key, 0)}, got {v!r}")
        if want is str and not isinstance(v, str):
            raise ConfigError(f"{where}: {key} must be a string, got {v!r}")


def check_toml(raw: dict[str, Any], path: Any) -> None:
    """The grid TOML's values (keys were checked by ``load_grid``); ``ConfigError`` naming the key and a valid value."""
    for key in ("models", "tasks"):
        if key in raw:
            _names(raw[key], key, path)
    if "seeds" in raw:
        s = raw["seeds"]
        if not isinstance(s, list) or not s or any(type(v) is not int or v < 0 for v in s) or len(set(s)) != len(s):
            raise ConfigError(
                f"{path}: seeds must be a non-empty list of distinct integers >= 0, e.g. [0, 1]; got {s!r}"
            )
    _config_values(raw.get("config", {}), f"{path} [config]")
    per_task = raw.get("task_config", {})
    if not isinstance(per_task, dict):
        raise ConfigError(f"{path}: task_config must hold one table per task, e.g. [task_config.toy] k = 4")
    for task, over in per_task.items():
        _config_values(over, f"{path} [task_config.{task}]")


def known_config_keys() -> set[str]:
    return {f.name for f in fields(FindingsConfig)} - {"seed"}


_HASHES: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) within the process."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        with open(path, "rb") as f:
            _HASHES[memo] = hashlib.file_digest(f, "sha256").hexdigest()
    return _HASHES[memo]


def input_id(name: str, kind: str) -> str:
    """What a grid input *is*: a registered model or built-in task as its name; a file as ``sha256:<hash>`` of its
    bytes; a model directory as the hash of its files' names and hashes; anything else (a Hub id) as its name."""
    registered = {*EMBEDDED, *TINY_MODELS, *ORGANISMS} if kind == "model" else set(known_tasks())
    if name in registered or name.startswith("hf:"):
        return name
    p = Path(name).expanduser()
    if p.is_file():
        return f"sha256:{_sha256(p)}"
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        listing = "\n".join(f"{f.relative_to(p)} {_sha256(f)}" for f in files)
        return f"sha256:{hashlib.sha256(listing.encode()).hexdigest()}"
    return name


def safe_part(name: str) -> str:
    """A path-safe folder-name part: a file's stem, a Hub id's ``/`` as ``_``; no leading dot, at most 40 characters."""
    p = Path(name)
    base = p.stem if p.suffix in (".csv", ".jsonl", ".safetensors", ".gguf") else name
    safe = safe_name(base).lstrip(".") or "_"
    return safe[:40]


LATER_FIELDS = ("heads", "fresh_after")  # FindingsConfig fields added after cells were sealed: keyed only when set


def cell_key(model: str, task: str, config: FindingsConfig) -> str:
    """12 hex digits of the sha256 of the model's and task's contents (``input_id``) and the cell's configuration
    (``LATER_FIELDS`` enter only when set, so a cell sealed before they existed keeps its key)."""
    cfg = {k: v for k, v in asdict(config).items() if not (k in LATER_FIELDS and v == "")}
    ident = {"model": input_id(model, "model"), "task": input_id(task, "task"), "config": cfg}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def check_grid(spec: Any, out: Path | str) -> Path:
    """Everything a grid needs that costs no model: ``--out``, model names, tasks and every cell's draws.
    Returns ``out`` as an absolute path. Cost: loading each task once."""
    out = check_out(out, overwrite=True)
    for model in spec.models:
        check_model_name(model)
    tasks = {t: load_task(t, seed=spec.seeds[0]) for t in spec.tasks}
    for cell in spec.cells():
        cfg = spec.cell_config(cell)
        stage_draws(tasks[cell.task], cfg.sizes, cfg.k + 1, seed=cell.seed)  # a task too small for k fails here
    return out


@contextmanager
def grid_lock(out: Path) -> Iterator[None]:
    """One ``findings`` run (or summary) per grid folder at a time; another fails at once with ``OutputError``."""
    out.mkdir(parents=True, exist_ok=True)
    busy = (
        f"another `mechicl findings` (pid {{pid}}) is running on the grid {out}; wait for it to finish (then run "
        f"again: finished cells are skipped), or pass another --out"
    )
    with exclusive(out / "grid", busy=busy):
        yield


def damaged_cells(out: Path, slugs: list[str]) -> dict[str, list[str]]:
    """The cells among ``slugs`` whose folder exists under ``out/cells`` but does not match its manifest."""
    bad = {}
    for slug in slugs:
        folder = out / "cells" / slug
        if folder.exists():
            problems = verify_manifest(folder)
            if problems:
                bad[slug] = problems
    return bad


def damaged_message(out: Path, bad: dict[str, list[str]]) -> str:
    listed = "; ".join(f"{slug}: {', '.join(p[:3])}" for slug, p in sorted(bad.items()))
    return (
        f"{len(bad)} cell folder(s) in {out}/cells do not match their manifest.json (edited or damaged): {listed}; "
        f"{RERUN_HINT}, or restore their files"
    )
