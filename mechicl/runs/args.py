"""Command-line arguments shared by the commands: argparse with one-line errors, value checks (ranges,
lists), the flag groups several commands share, and ``run_command`` (exit codes, one-line errors).

Each type raises ``argparse.ArgumentTypeError`` with the problem and the accepted values; ``Parser``
prints it as one line ``mechicl: error: argument --x: ...`` with exit code 2, before anything loads.
Imports nothing heavy: the CLI imports it at start-up (``runs.preflight`` holds the checks that need more).
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mechicl.errors import USER_ERRORS
from mechicl.models.registry import DEFAULT_MODEL


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``mechicl: error: ...`` and exit code 2, like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"mechicl: error: {message} (see `{self.prog} --help`)\n")


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``lo``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {v}")
        return v
    return parse


def fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {v:g}")
    return v


def words(text: str) -> tuple[str, ...]:
    """``--label-names``: comma-separated, stripped, at least two, no empty or repeated word."""
    words = tuple(w.strip() for w in text.split(","))
    if len(words) < 2 or not all(words) or len(set(words)) != len(words):
        raise argparse.ArgumentTypeError(f"must be two or more distinct comma-separated words, e.g. negative,positive; got {text!r}")
    return words


def set_sizes(text: str) -> tuple[int, ...]:
    """``--set-sizes``: comma-separated integers >= 1."""
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1, e.g. 1,2,4; got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1, e.g. 1,2,4; got {text!r}")
    return sizes


def add_run_args(p: argparse.ArgumentParser, label_names: bool = True, seed: int | None = 0) -> None:
    """--seed, --threads, --out, --overwrite (and --label-names) for every command that writes a run folder."""
    if label_names:
        p.add_argument("--label-names", type=words, default=None,
                       help="comma list of label words for file tasks with integer labels (class 0, 1, ...)")
    p.add_argument("--seed", type=int_at_least(0), default=seed, help="random seed (context draws)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<time>-...); must be new or empty")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (only once the run is complete)")


def _warn_one_line(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    print(f"mechicl: warning: {message}", file=sys.stderr)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command's function; warnings print as one line ``mechicl: warning: ...``.

    Exit codes: 0 done; 2 a user mistake or an environment problem (a ``MechiclError``, an ``OSError``
    such as a full disk), one line ``mechicl: error: ...`` (bad flags exit 2 in ``Parser``); 130 Ctrl-C,
    one line, and no partial run folder (``runs.folder.staged``). Anything else is a bug in mechicl: its
    traceback, then one line asking for a report, exit 1 (not hidden: the traceback is what a report needs).
    """
    with warnings.catch_warnings():
        warnings.showwarning = _warn_one_line
        try:
            return func(args)
        except (*USER_ERRORS, OSError) as e:
            text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            print(f"mechicl: error: {text if isinstance(e, USER_ERRORS) else f'{type(e).__name__}: {text}'}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("mechicl: interrupted; no partial run folder was left (an earlier --out folder is unchanged)", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 -- a bug: traceback + one line, exit 1 (see docstring)
            traceback.print_exc()
            print(f"mechicl: internal error ({type(e).__name__}); this is a bug in mechicl, please report it with the "
                  f"traceback above", file=sys.stderr)
            return 1


def add_model_task(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--task``, the same in every command that runs a model on a task."""
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL}); see `mechicl models`")
    p.add_argument("--task", default="vader-words", help="task name or .csv/.jsonl path (default vader-words); see `mechicl tasks`")


def add_behavior_args(p: argparse.ArgumentParser, conditions: str) -> None:
    add_model_task(p)
    p.add_argument("--conditions", default=conditions, help="comma list of default, random, flipped, arbitrary[:w1/w2]")
    p.add_argument("--k-max", type=int_at_least(0), default=16, help="largest number of in-context examples scored (default 16)")
    p.add_argument("--n-contexts", type=int_at_least(2), default=64, help="context draws per condition (default 64)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument("--multi-token", action="store_true", help="allow label words of several tokens (sequence scoring; slower)")
    add_run_args(p)


def add_inside_args(p: argparse.ArgumentParser, n_contexts: int) -> None:
    add_model_task(p)
    p.add_argument("--n-contexts", type=int_at_least(2), default=n_contexts, help=f"contexts per condition (default {n_contexts})")
    p.add_argument("--n-examples", type=int_at_least(2), default=16, help="labelled examples per context (default 16)")
    p.add_argument("--k-min", type=int_at_least(1), default=4, help="average over readout slots with >= k-min earlier examples (default 4)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument("--top", type=int_at_least(1), default=10, help="rows in the printed top lists (default 10)")
    add_run_args(p)
