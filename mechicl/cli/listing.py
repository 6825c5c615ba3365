"""``mechicl models`` and ``mechicl tasks``: the names mechicl knows, printed without loading torch."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import textwrap
from pathlib import Path

from mechicl.models.registry import CONSTRUCTED, DEFAULT_MODEL, EMBEDDED, known_models


def models(args: argparse.Namespace) -> int:
    """Print one line per known model name, the default marked."""
    for name in known_models():
        desc = EMBEDDED[name].description if name in EMBEDDED else "random 2-layer boot_native model for tests"
        if name.startswith("organism-"):
            variant = "".join(f", {x}" for x in name.split("-")[2:])  # s1, s2, unpruned
            desc = f"trained model organism ({name.split('-')[1]} prior{variant}), see docs/organism.md"
        if name in CONSTRUCTED:
            desc = f"{CONSTRUCTED[name].description}, see docs/organism.md"
        print(f"{name:24s} {desc}{'  (default)' if name == DEFAULT_MODEL else ''}")
    print("Also: a .gguf file, a local Hugging Face model directory, or a Hub id org/name (needs internet).")
    return 0


def tasks_text(doc: str) -> str:
    """``data.tasks``' docstring as plain text: the intro line, then one aligned, wrapped entry per task source."""
    plain = re.sub(r"`+([^`]*)`+", r"\1", doc.strip()).replace("balance=False", "--no-balance")
    intro, entries = plain.splitlines()[0], []
    for line in plain.splitlines()[1:]:
        m = re.match(r"^  (\S.*?)\s{2,}(\S.*)$", line)
        if m:
            entries.append([m.group(1), m.group(2).strip()])
        elif entries and line.startswith("    ") and line.strip():
            entries[-1][1] += " " + line.strip()
    width = max((len(n) for n, _ in entries), default=0) + 2
    lines = [intro, "", "Tasks (--task):"]
    for name, text in entries:
        lines += textwrap.wrap(text, 100, initial_indent=f"  {name:<{width}}", subsequent_indent=" " * (width + 2))
    own = (
        "Your own data: --task file.csv or file.jsonl (columns text,label); --label-names gives the words of integer "
        "labels, --template how an example is written, e.g. 'Review: {input}\\nSentiment: {label}'."
    )
    return "\n".join([*lines, "", *textwrap.wrap(own, 100)])


def tasks(args: argparse.Namespace) -> int:
    """Print the task catalogue, read from ``data.tasks``' docstring in its source (importing it loads torch)."""
    source = Path(importlib.util.find_spec("mechicl.data.tasks").origin).read_text(encoding="utf-8")
    print(tasks_text(ast.get_docstring(ast.parse(source), clean=False) or ""))
    return 0
