"""What a command checks before any compute, and its atomic run folder, from the parsed CLI arguments.

``prepare`` checks the model name or path (``models.loading.check_model_name``: a missing file or a
damaged .gguf/.safetensors fails here, not after minutes) and the output folder (``runs.folder.check_out``);
``staged_args`` opens the partial folder that ``runs.folder.staged`` publishes with a manifest.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mechicl.errors import ConfigError
from mechicl.models.base import LoadedModel
from mechicl.models.loading import check_model_name
from mechicl.runs.folder import check_out, default_out, staged


def prepare(args: argparse.Namespace, kind: str, model: str, task: str) -> Path:
    """Checks that need no compute: the model name or path, and the output folder. Returns the run folder path."""
    check_model_name(model)
    return check_out(args.out or default_out(kind, model, task), args.overwrite)


@contextmanager
def staged_args(args: argparse.Namespace, out: Path) -> Iterator[Path]:
    """The partial run folder; published to ``out`` with a manifest only if the block completes."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in {"func", "argv"}}
    with staged(out, overwrite=args.overwrite, command=["mechicl", *args.argv], config=config) as tmp:
        yield tmp


def check_head_sets(args: argparse.Namespace, loaded: LoadedModel | None = None) -> None:
    """``heads``: set sizes within --candidates (before loading) and both within the model's heads (after)."""
    if max(args.set_sizes) > args.candidates:
        raise ConfigError(f"--set-sizes {max(args.set_sizes)} is larger than --candidates {args.candidates}: the sets are "
                          f"the top-n candidates; raise --candidates or use smaller sizes")
    if loaded is not None:
        n_heads = loaded.model.cfg.n_layers * loaded.model.cfg.n_heads
        if max(args.set_sizes) > n_heads or args.candidates > n_heads:
            raise ConfigError(f"--set-sizes {max(args.set_sizes)} / --candidates {args.candidates}: {loaded.name} has "
                              f"only {n_heads} heads; use at most {n_heads}")
