"""What every run command shares: load the model, run inside the staged run folder, report what it wrote.

Each command's module (``runs.<command>``) has ``command(args) -> int``: it turns the parsed flags into its
config and calls ``in_folder`` with what to run. ``mechicl.cli.dispatch`` imports that module by name when
the command runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mechicl.data.task import check_tokenization
from mechicl.errors import LabelTokenError
from mechicl.models.base import LoadedModel
from mechicl.models.loading import load_model
from mechicl.runs.parsers import MULTI_TOKEN
from mechicl.runs.preflight import prepare, record_ran, staged_args, task_from_args


def load(
    model: str, threads: int | None, task: Any = None, device: str = "cpu", dtype: str = "float32"
) -> tuple[LoadedModel, float]:
    """Set torch's thread count (if given), load ``model`` and report it; check that its tokenizer reads
    ``task`` (``check_tokenization``) before any compute. Returns it and the start time."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    loaded = load_model(model, device=device, dtype=dtype)
    print(
        f"[mechicl] loaded {loaded.name} ({loaded.source}; {loaded.device}, {loaded.dtype}) in "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    if task is not None:
        check_tokenization(task, loaded.tokenizer)
    return loaded, t0


def in_folder(
    args: argparse.Namespace,
    kind: str,
    run: Callable[[Any, Any, Path], str],
    config: Any = None,
    model: str | None = None,
    task_spec: str | None = None,
    **task_kw: Any,
) -> int:
    """A run command's shared path: check the model and --out, load the task (``preflight.task_from_args``),
    then load the model and call ``run(loaded, task, folder)`` inside the staged run folder, add what ran to its
    config.json (``preflight.record_ran``; written from ``config`` if the command wrote none); print its text."""
    model = model or args.model
    out = prepare(args, kind, model, task_spec or args.task)
    task = task_from_args(args, task_spec, **task_kw)
    try:
        with staged_args(args, out) as tmp:
            loaded, t0 = load(
                model, args.threads, task, getattr(args, "device", "cpu"), getattr(args, "dtype", "float32")
            )
            text = run(loaded, task, tmp)
            record_ran(tmp, loaded, task, config)
    except LabelTokenError as e:
        if args.command in MULTI_TOKEN:
            raise
        head = str(e).split(" or allow multi-token labels")[0].rstrip(", ")
        raise LabelTokenError(
            f"{head}, or pass --template so that it stays whole. `mechicl {args.command}` reads one "
            f"token per label (--multi-token is for behavior, demo and run only)."
        ) from e
    print(text)
    done(out, t0)
    return 0


def done(out: Any, t0: float) -> None:
    """Report the run folder ``out`` (a path or a ``RunFolder``) and the wall time."""
    out = Path(getattr(out, "path", out))
    print(f"[mechicl] wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    print(f"[mechicl] total wall time {time.perf_counter() - t0:.0f} s")
