"""What a command checks before any compute, the task it runs on, its atomic run folder, and the
record of what ran, from the parsed CLI arguments.

``prepare`` checks the model name or path (``models.loading.check_model_name``: a missing file or a
damaged .gguf/.safetensors fails here, not after minutes) and the output folder (``runs.folder.check_out``);
``task_from_args`` loads the task with the shared task flags (``--label-names``, ``--template``);
``staged_args`` opens the partial folder that ``runs.folder.staged`` publishes with a manifest;
``record_ran`` adds what actually ran (model, task, label words, template) to the folder's ``config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mechicl.data.task import Task, Template
from mechicl.data.tasks import known_tasks, load_task
from mechicl.errors import ConfigError
from mechicl.models.base import LoadedModel
from mechicl.models.loading import check_model_name
from mechicl.runs.folder import RunFolder, check_out, default_out, staged


def prepare(args: argparse.Namespace, kind: str, model: str, task: str) -> Path:
    """Checks that need no compute: the model name or path, and the output folder. Returns the run folder path."""
    check_model_name(model)
    return check_out(args.out or default_out(kind, model, task), args.overwrite)


def task_from_args(
    args: argparse.Namespace,
    spec: str | None = None,
    seed: int | None = None,
    label_names: tuple[str, ...] | None = None,
) -> Task:
    """``load_task(spec or args.task)`` with ``--label-names`` (file tasks: class words; built-in tasks: new words for
    their classes), ``--no-balance`` (user data keeps every row) and ``--template`` (replaces the example template;
    the separator and prefix stay the task's).
    ``spec``, ``seed`` and ``label_names`` replace the arguments' values (``mechicl run`` takes them from its config)."""
    spec = spec or args.task
    names = label_names or getattr(args, "label_names", None)
    task = load_task(
        spec,
        seed=args.seed if seed is None else seed,
        label_names=names,
        balance=not getattr(args, "no_balance", False),
    )
    if names and spec in known_tasks() and tuple(names) != task.label_names:
        if len(names) != task.n_classes:
            raise ConfigError(
                f"--label-names gives {len(names)} words but task {spec} has {task.n_classes} classes "
                f"({', '.join(task.label_names)}); pass one word per class, in that order"
            )
        task = dataclasses.replace(task, label_names=tuple(names))
    example = getattr(args, "template", None)
    if example:
        t = task.template
        task = dataclasses.replace(task, template=Template(example, t.separator, t.prefix))
    return task


@contextmanager
def staged_args(args: argparse.Namespace, out: Path) -> Iterator[Path]:
    """The partial run folder; published to ``out`` with a manifest only if the block completes."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in {"func", "argv"}}
    with staged(out, overwrite=args.overwrite, command=["mechicl", *args.argv], config=config) as tmp:
        yield tmp


def ran(loaded: LoadedModel, task: Task) -> dict[str, Any]:
    """What actually ran: the loaded model's name and source, the task's name, size, label words and template."""
    t = task.template
    return {
        "model": loaded.name,
        "model_source": str(loaded.source),
        "device": str(getattr(loaded, "device", "cpu")),
        "dtype": str(getattr(loaded, "dtype", "float32")),
        "task": task.name,
        "task_rows": len(task),
        "class_counts": task.class_counts(),
        "label_names": list(task.label_names),
        "template": {"example": t.example, "separator": t.separator, "prefix": t.prefix},
    }


def record_ran(folder: Path, loaded: LoadedModel, task: Task, config: Any = None) -> None:
    """Add ``"ran": ran(loaded, task)`` to ``folder/config.json`` (written from ``config`` when the command wrote none)."""
    path = Path(folder) / "config.json"
    if path.is_file():
        record = json.loads(path.read_text(encoding="utf-8"))
    elif config is not None:
        record = json.loads(
            json.dumps(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config, default=str)
        )
    else:
        record = {}
    record["ran"] = ran(loaded, task)
    RunFolder(folder).json("config.json", record)


def check_head_sets(args: argparse.Namespace, loaded: LoadedModel | None = None) -> int:
    """``heads``: set sizes within --candidates (before loading), and within the model's heads (after). Returns the
    candidates to confirm: --candidates, or every head (with a warning) when the model has fewer."""
    if max(args.set_sizes) > args.candidates:
        raise ConfigError(
            f"--set-sizes {max(args.set_sizes)} is larger than --candidates {args.candidates}: the sets are "
            f"the top-n candidates; raise --candidates or use smaller sizes"
        )
    if loaded is None:
        return args.candidates
    n_heads = loaded.model.cfg.n_layers * loaded.model.cfg.n_heads
    if max(args.set_sizes) > n_heads:
        raise ConfigError(
            f"--set-sizes {max(args.set_sizes)}: {loaded.name} has only {n_heads} heads; use at most {n_heads}"
        )
    if args.candidates > n_heads:
        warnings.warn(
            f"--candidates {args.candidates}: {loaded.name} has {n_heads} heads; confirming all {n_heads}", stacklevel=2
        )
    return min(args.candidates, n_heads)
