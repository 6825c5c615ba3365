"""Which function runs each command, and the one place that imports it.

A command's module is imported when the command runs, not at start-up, so that ``mechicl --help``,
``mechicl models`` and ``mechicl tasks`` answer without loading torch and TransformerLens (several seconds).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

COMMANDS = {  # command name -> "module:function"; the function takes the parsed flags and returns an exit code
    "demo": "mechicl.runs.behavior:command",
    "behavior": "mechicl.runs.behavior:command",
    "run": "mechicl.runs.run:command",
    "attention": "mechicl.runs.attention:command",
    "lens": "mechicl.runs.lens:command",
    "dla": "mechicl.runs.dla:command",
    "prior": "mechicl.runs.prior:command",
    "organism train": "mechicl.runs.organism:train_command",
    "patch": "mechicl.runs.patch:command",
    "heads": "mechicl.runs.heads:command",
    "attribute": "mechicl.runs.attribute:command",
    "report": "mechicl.runs.report:command",
    "circuit": "mechicl.runs.circuit:command",
    "aggregate": "mechicl.runs.aggregate:command",
    "findings": "mechicl.runs.findings:command",
    "models": "mechicl.cli.listing:models",
    "tasks": "mechicl.cli.listing:tasks",
}


def command_name(args: argparse.Namespace) -> str:
    """The table key of parsed flags: the command, with its subcommand if it has one (``organism train``)."""
    sub = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {sub}" if sub else args.command


def resolve(name: str) -> Callable[[argparse.Namespace], int]:
    """Import the module that runs command ``name`` and return its function."""
    module, function = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), function)
