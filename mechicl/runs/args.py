"""Command-line arguments shared by the commands: argparse with one-line errors, value checks (ranges,
lists, templates), the one vocabulary of shared flags, deprecated spellings, and ``run_command`` (exit
codes, one-line errors).

**The shared flags** mean the same in every command that has them (``tests/runs/test_cli_flags.py``
walks every subcommand and checks it):

- ``--model``, ``--task``: what runs (``add_model_task``).
- ``--k``: observed in-context examples, k demonstrations + 1 query per context (``add_k``); for
  ``behavior`` / ``demo`` / ``run`` the largest k of the curve (k = 0..K are scored).
- ``--label-names``, ``--template``, ``--no-balance``: the task's label words, example template and class
  balancing of user data (``add_task_flags``).
- ``--batch-size``: rows (contexts) per batched forward, a memory/speed knob (``add_batch_size``).
- ``--multi-token``: label words of several tokens (sequence scoring; commands that score labels by
  whole sequences only).
- ``--seed``, ``--threads``, ``--out``, ``--overwrite``: every command that writes a run folder (``add_run_args``).

Old spellings (``--n-examples``, ``--k-max``, ``--max-rows``) still work for one release: they set the
new flag and print ``mechicl: warning: ... is deprecated; use ...`` on stderr.

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

from mechicl.data.names import head_name, parse_heads
from mechicl.data.task import Template
from mechicl.errors import USER_ERRORS, MechiclError, TaskError
from mechicl.models.registry import DEFAULT_MODEL


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's time limit), raised like Ctrl-C while a run folder is staged
    (``runs.folder.staged``), so the partial folder is removed the same way; ``run_command`` exits 143."""


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
        raise argparse.ArgumentTypeError(
            f"must be two or more distinct comma-separated words, e.g. negative,positive; got {text!r}"
        )
    return words


def template(text: str) -> str:
    """``--template``: an example template with ``{input}`` and a final ``{label}``; ``\\n`` and ``\\t`` are read as
    a newline and a tab (so the shell can pass ``"Input: {input}\\nLabel: {label}"``)."""
    example = text.replace("\\n", "\n").replace("\\t", "\t")
    try:
        Template(example)
    except TaskError as e:
        raise argparse.ArgumentTypeError(f"{e}; e.g. 'Review: {{input}}\\nSentiment: {{label}}'") from None
    return example


def int_list(lo: int, example: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated integers >= ``lo`` (``example`` shown in the error)."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(x) for x in text.split(","))
        except ValueError:
            values = ()
        if not values or min(values) < lo:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers >= {lo}, e.g. {example}; got {text!r}")
        return values

    return parse


def key_values(text: str) -> str:
    """``--slurm``: comma-separated ``key=value`` pairs with non-empty keys and values; returned unchanged."""
    pairs = [kv.split("=", 1) for kv in text.split(",")]
    if not all(len(kv) == 2 and kv[0].strip() and kv[1].strip() for kv in pairs):
        raise argparse.ArgumentTypeError(
            f"must be comma-separated key=value pairs, e.g. slurm_partition=gpu,timeout_min=60; got {text!r}"
        )
    return text


def head_list(text: str) -> str:
    """``--heads``: heads spelled ``L1H1,L0H2`` (``data.names.parse_heads``), at least one, none twice; returned as given."""
    try:
        heads = parse_heads(text)
    except MechiclError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    twice = sorted({head_name(*h) for h in heads if heads.count(h) > 1})
    if not heads or twice:
        raise argparse.ArgumentTypeError(
            f"must name each head once, e.g. L1H1,L0H2; got {text!r}"
            + (f" ({', '.join(twice)} twice)" if twice else "")
        )
    return text


set_sizes = int_list(1, "1,2,4")  # --set-sizes, --completeness-steps


def deprecated(new: str, convert: Callable[[int], int] = lambda v: v, lo: int = 0) -> type[argparse.Action]:
    """An action for an old flag spelling: it sets the new flag's dest to ``convert(value)`` and prints a
    one-line deprecation warning naming the new flag and value on stderr."""
    check = int_at_least(lo)

    class Deprecated(argparse.Action):
        def __call__(
            self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: str | None = None
        ) -> None:
            try:
                value = convert(check(values))
            except argparse.ArgumentTypeError as e:
                parser.error(f"argument {option_string}: {e}")
            print(
                f"mechicl: warning: {option_string} is deprecated and will be removed in the next release; "
                f"use {new} {value} (same run)",
                file=sys.stderr,
            )
            setattr(namespace, self.dest, value)

    return Deprecated


K_MEANING = "observed in-context examples per context: k demonstrations + 1 query"
CURVE_MEANING = (
    "largest k of the curve (k = 0..K observed in-context examples are scored; a context holds K + 1 examples)"
)
BATCH_MEANING = "rows (contexts) per batched forward: lower it if memory runs out, raise it for speed"


def add_k(p: argparse.ArgumentParser, default: int | None, *, curve: bool = False, lo: int = 1, note: str = "") -> None:
    """``--k`` (dest ``k``) and its old spelling: ``--n-examples N`` (= ``--k N-1``), or ``--k-max`` for curves."""
    shown = "the config's" if default is None else default
    p.add_argument(
        "--k",
        type=int_at_least(0 if curve else lo),
        default=default,
        metavar="K",
        help=f"{CURVE_MEANING if curve else K_MEANING}{note} (default {shown})",
    )
    if curve:
        p.add_argument("--k-max", dest="k", action=deprecated("--k"), help=argparse.SUPPRESS)
    else:
        p.add_argument(
            "--n-examples", dest="k", action=deprecated("--k", lambda n: n - 1, lo + 1), help=argparse.SUPPRESS
        )


def add_batch_size(p: argparse.ArgumentParser, default: int | None) -> None:
    """``--batch-size`` (dest ``batch_size``) and its old spelling ``--max-rows``."""
    shown = "the config's" if default is None else default
    p.add_argument("--batch-size", type=int_at_least(1), default=default, help=f"{BATCH_MEANING} (default {shown})")
    p.add_argument("--max-rows", dest="batch_size", action=deprecated("--batch-size", lo=1), help=argparse.SUPPRESS)


def add_multi_token(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--multi-token",
        action="store_true",
        help="allow label words of several tokens (each class's whole token sequence is scored; slower)",
    )


def add_task_flags(p: argparse.ArgumentParser) -> None:
    """``--label-names``, ``--template`` and ``--no-balance``: which rows and words the task has, how examples are written."""
    p.add_argument(
        "--label-names",
        type=words,
        default=None,
        help="comma list of label words: file tasks, the word of class 0, 1, ... (integer labels) or the "
        "classes to keep (text labels); built-in tasks, new words for their classes in order",
    )
    p.add_argument(
        "--template",
        type=template,
        default=None,
        help="example template with {input} and a final {label}, e.g. 'Input: {input}\\nLabel: {label}' "
        "(\\n = newline); default: the task's own (file tasks: 'Input: {input}\\nLabel: {label}')",
    )
    p.add_argument(
        "--no-balance",
        action="store_true",
        help="keep every row of a .csv/.jsonl or hf: task (default: every class is downsampled to the "
        "smallest, seeded by --seed; built-in tasks are always balanced)",
    )


def add_run_args(p: argparse.ArgumentParser, label_names: bool = True, seed: int | None = 0) -> None:
    """--seed, --threads, --out, --overwrite (and the task flags) for every command that writes a run folder."""
    if label_names:
        add_task_flags(p)
    p.add_argument("--seed", type=int_at_least(0), default=seed, help="random seed (context draws)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps (default cpu; docs/devices.md)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="weights and activations (default float32; float16 overflows on Gemma-3: docs/devices.md)",
    )
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<time>-...); must be new or empty")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out folder (only once the run is complete)"
    )


def add_model_task(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--task``, the same in every command that runs a model on a task."""
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL}); see `mechicl models`"
    )
    p.add_argument(
        "--task", default="vader-words", help="task name or .csv/.jsonl path (default vader-words); see `mechicl tasks`"
    )


def _warn_one_line(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    print(f"mechicl: warning: {message}", file=sys.stderr)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command's function; warnings print as one line ``mechicl: warning: ...``.

    Exit codes: 0 done; 2 a user mistake or an environment problem (a ``MechiclError``, an ``OSError``
    such as a full disk), one line ``mechicl: error: ...`` (bad flags exit 2 in ``Parser``); 130 Ctrl-C,
    143 SIGTERM, one line, and no partial run folder (``runs.folder.staged``). Anything else is a bug in mechicl: its
    traceback, then one line asking for a report, exit 1 (not hidden: the traceback is what a report needs).
    """
    with warnings.catch_warnings():
        warnings.showwarning = _warn_one_line
        try:
            return func(args)
        except (*USER_ERRORS, OSError) as e:
            text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            print(
                f"mechicl: error: {text if isinstance(e, USER_ERRORS) else f'{type(e).__name__}: {text}'}",
                file=sys.stderr,
            )
            return 2
        except Terminated:
            print("mechicl: terminated (SIGTERM); no partial run folder was left", file=sys.stderr)
            return 143
        except KeyboardInterrupt:
            print(
                "mechicl: interrupted; no partial run folder was left (an earlier --out folder is unchanged)",
                file=sys.stderr,
            )
            return 130
        except Exception as e:  # noqa: BLE001 -- a bug: traceback + one line, exit 1 (see docstring)
            traceback.print_exc()
            print(
                f"mechicl: internal error ({type(e).__name__}); this is a bug in mechicl, please report it with the "
                f"traceback above",
                file=sys.stderr,
            )
            return 1
