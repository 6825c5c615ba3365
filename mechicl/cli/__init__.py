"""Command line: ``mechicl demo | behavior | run | attention | lens | dla | patch | heads | attribute | circuit | aggregate
| report | findings | organism train | models | tasks``.

``parser`` builds the flags (shared ones: ``runs.args``; each command's: ``runs.parsers``); ``dispatch`` maps each
command to the function that runs it (``runs.<command>:command``; ``runs.organism:train_command``) and imports
it only then, so that ``--help`` answers without loading torch. The layers: cli -> runs -> analysis -> data/models.
"""

from __future__ import annotations

import sys

from mechicl.cli.dispatch import command_name, resolve
from mechicl.cli.parser import build_parser
from mechicl.runs.args import run_command
from mechicl.runs.parsers import MULTI_TOKEN

__all__ = ["MULTI_TOKEN", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit codes and one-line errors: ``runs.args.run_command``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return run_command(lambda a: resolve(command_name(a))(a), args)
