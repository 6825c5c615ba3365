"""docs/outputs.md lists every file each command writes and every column of its CSVs (run on tiny)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from mechicl.cli import build_parser, main
from tests.helpers import SMALL_GRID

DOC = Path(__file__).resolve().parents[2] / "docs" / "outputs.md"
ROOT = DOC.parents[1]
COMMON = {"summary.md", "config.json", "manifest.json"}
TINY = ["--model", "tiny", "--task", "toy", "--threads", "1"]
RUNS = {
    "behavior": [
        "behavior",
        *TINY,
        "--conditions",
        "default,flipped,default>flipped@2",
        "--k",
        "3",
        "--n-contexts",
        "4",
    ],
    "run": [
        "run",
        str(ROOT / "experiments" / "nh3_label_switch.toml"),
        "--model",
        "organism-strong",
        "--task",
        "organism",
        "--n-contexts",
        "4",
        "--threads",
        "1",
    ],
    "attention": ["attention", *TINY, "--n-contexts", "2", "--k", "3", "--k-min", "1"],
    "lens": ["lens", *TINY, "--n-contexts", "2", "--k", "3", "--k-min", "1"],
    "dla": ["dla", *TINY, "--n-contexts", "2", "--k", "3", "--k-min", "1"],
    "prior": ["prior", *TINY, "--n-contexts", "4", "--k", "3", "--k-min", "1", "--heads", "L1H1;L0H0,L1H0"],
    "patch": ["patch", *TINY, "--kinds", "resid,head_out,head_v_label", "--n-contexts", "2", "--k", "3"],
    "heads": [  # an organism: tiny has no in-context effect, so its cell's tables would be empty
        "heads",
        *["--model", "organism-strong", "--task", "organism", "--threads", "1"],
        *["--k", "8", "--n-screen", "4", "--n-confirm", "4", "--n-eval", "8"],
        *["--candidates", "4", "--n-top", "2", "--n-control", "2"],
    ],
    "attribute": ["attribute", *TINY, "--n-contexts", "2", "--k", "3", "--steps", "3", "--completeness-steps", "1,3"],
    "circuit": ["circuit", *TINY, "--k", "3", "--n-select", "2", "--n-eval", "3"],
    "aggregate": [
        "aggregate",
        "--model",
        "organism-strong",
        "--task",
        "organism",
        "--threads",
        "1",
        "--k",
        "4",
        "--n-select",
        "4",
        "--n-fit",
        "4",
        "--n-eval",
        "4",
        "--n-boot",
        "20",
        "--n-heads",
        "2",
    ],
    "report": ["report", *TINY, "--quick"],
}
NO_RUN_FOLDER = {"models", "tasks", "organism"}  # print to the terminal; organism train writes a checkpoint + card
GRID = {"findings"}  # a grid folder (cells/ + summary/), checked by test_findings_files_and_columns_are_documented
NOT_YET = {
    "findings"
}  # a grid folder (cells/<cell>/..., summary/...): its section of docs/outputs.md is still to write
SAME_AS = {"demo": "behavior"}  # documented together ("also `mechicl demo`"), same writer


def _sections() -> dict[str, str]:
    """Command name -> its section of the doc."""
    parts = re.split(r"\n## `mechicl (\w+)[^\n]*\n", DOC.read_text())
    return dict(zip(parts[1::2], parts[2::2]))


def _file_patterns(section: str) -> list[re.Pattern]:
    table = section.split("\n####")[0]
    names = [n for row in re.findall(r"^\| (.+?) \|", table, flags=re.M) for n in re.findall(r"`([^`]+)`", row)]
    return [
        re.compile(re.sub(r"<[^>]+>", "[^/]+", re.escape(n).replace(r"\<", "<").replace(r"\>", ">")) + "$")
        for n in names
    ]


def _columns(section: str) -> dict[str, set[str]]:
    out = {}
    for name, table in re.findall(r"#### `([^`]+)`\n(.*?)(?=\n####|\Z)", section, flags=re.S):
        out[name] = {c for row in re.findall(r"^\| (.+?) \|", table, flags=re.M) for c in re.findall(r"`([^`]+)`", row)}
    return out


def test_every_command_is_run_here():
    """A new command that writes a run folder needs a RUNS entry (and so a section in docs/outputs.md)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = set(sub.choices) - set(RUNS) - NO_RUN_FOLDER - set(SAME_AS) - GRID - NOT_YET
    assert not missing, f"add {sorted(missing)} to RUNS in {Path(__file__).name} and a section to docs/outputs.md"


def test_the_doc_parses_into_a_section_per_command():
    sections = _sections()
    assert set(RUNS) <= set(sections)
    assert any(p.match("head_out_denoise.csv") for p in _file_patterns(sections["patch"]))
    assert "effect" in _columns(sections["patch"])["patching.csv"]


@pytest.mark.parametrize("command", list(RUNS))
def test_every_file_and_column_is_documented(command, tmp_path, capsys):
    out = tmp_path / command
    assert main([*RUNS[command], "--out", str(out)]) == 0
    capsys.readouterr()
    sections = _sections()
    section = sections[command]
    shared: dict[str, set[str]] = {}  # "as for mechicl behavior"; a file name two commands write: either's columns
    for other in sections.values():
        for f, c in _columns(other).items():
            shared[f] = shared.get(f, set()) | c
    patterns, columns = _file_patterns(section), {**shared, **_columns(section)}
    written = sorted(p.name for p in out.iterdir())
    ran = json.loads((out / "config.json").read_text())["ran"]  # one config.json per folder, with what ran
    assert ran["model"] == RUNS[command][RUNS[command].index("--model") + 1] and ran["task"] in {"toy", "organism"}
    missing = [f for f in written if f not in COMMON | {"config.toml"} and not any(p.match(f) for p in patterns)]
    assert not missing, f"docs/outputs.md does not list {missing} for `mechicl {command}`"
    for f in written:
        if f.endswith(".csv") and not re.fullmatch(r".+_(de)?noise\.csv", f):  # per-sweep CSVs = patching.csv rows
            undocumented = set(pd.read_csv(out / f).columns) - columns.get(f, set())
            assert not undocumented, f"docs/outputs.md: columns {sorted(undocumented)} of {f} are not described"


def test_findings_files_and_columns_are_documented(tmp_path, capsys):
    out = tmp_path / "grid"
    assert (
        main(
            [
                *SMALL_GRID,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    section = _sections()["findings"]
    patterns, columns = _file_patterns(section), _columns(section)
    folders = [*(out / "cells").iterdir(), out / "summary"]
    for folder in folders:
        for f in sorted(p.name for p in folder.iterdir()):
            assert f == "manifest.json" or any(p.match(f) for p in patterns), (
                f"docs/outputs.md does not list {f} (findings)"
            )
            if f.endswith(".csv"):
                undocumented = set(pd.read_csv(folder / f).columns) - columns.get(f, set())
                assert not undocumented, f"docs/outputs.md: columns {sorted(undocumented)} of {f} are not described"
