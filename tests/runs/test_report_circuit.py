"""Section 7 of `mechicl report` read from real `mechicl findings` and `mechicl circuit` folders (organism-strong),
every quoted number matching their CSVs; folders that cannot fill it are refused before any forward."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from mechicl.cli import main
from mechicl.errors import ConfigError
from mechicl.runs.report_circuit import check_external, circuit_section
from mechicl.viz.report_html import Figure, Note, Table
from mechicl.viz.table_words import words
from tests.helpers import SMALL_GRID

ORG = ["--model", "organism-strong", "--task", "organism"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("external")
    assert (
        main(
            [
                *SMALL_GRID,
                "--threads",
                "1",
                "--out",
                str(base / "grid"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "circuit",
                *ORG,
                "--k",
                "5",
                "--n-select",
                "4",
                "--n-eval",
                "6",
                "--positions",
                "label",
                "--threads",
                "1",
                "--out",
                str(base / "circuit"),
            ]
        )
        == 0
    )
    return base / "grid", base / "circuit"


def test_section_quotes_the_folders_csvs(folders):
    grid, circ = folders
    sec = circuit_section(str(grid), str(circ), "organism-strong", "organism")
    tables = [b for b in sec.blocks if isinstance(b, Table)]
    assert len(tables) == 2 and any(isinstance(b, Figure) and b.path.name.startswith("circuit_") for b in sec.blocks)
    headers = [h for t in tables for h in words(t.df).columns]  # what the report shows: words, CIs merged
    assert "path effect (share of the full effect) [95% CI]" in headers and not [h for h in headers if "_" in h]
    cells = pd.read_csv(grid / "summary" / "cells.csv")
    assert f"{len(cells)} cells of organism-strong" in tables[0].caption
    assert f"{int(cells.has_effect.sum())} with an in-context effect" in tables[0].caption
    paths = pd.read_csv(circ / "paths.csv")
    sig = paths[((paths.ci_low > 0) | (paths.ci_high < 0)) & (paths.effect.abs() >= 0.05)]
    assert f"of {len(paths)} sender -> receiver paths, {len(sig)} have" in tables[1].caption
    if len(sig):
        best = sig.loc[sig.effect.abs().idxmax()]
        assert f"{best.sender} -> {best.receiver} ({best.input}) {best.effect:+.2f}" in tables[1].caption


def test_without_folders_the_section_names_the_commands():
    sec = circuit_section(None, None, "organism-strong", "organism")
    text = " ".join(b.text for b in sec.blocks if isinstance(b, Note))
    assert "mechicl findings --models organism-strong" in text and "--findings" in text
    assert "mechicl circuit --model organism-strong --task organism" in text and "--circuit" in text


def test_folders_that_cannot_fill_it_are_refused(folders, tmp_path, capsys):
    grid, circ = folders
    with pytest.raises(ConfigError, match="summary"):
        check_external(str(tmp_path), None, "organism-strong")
    with pytest.raises(ConfigError, match="was run on 'organism-strong'"):
        check_external(None, str(circ), "tiny")
    assert main(["report", *ORG, "--quick", "--circuit", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "mechicl circuit" in capsys.readouterr().err and not (tmp_path / "r" / "report.html").exists()


def test_report_shows_them_and_its_rerun_command_keeps_them(folders, tmp_path):
    grid, circ = folders
    assert (
        main(
            [
                "report",
                *ORG,
                "--arbitrary",
                "a/b",
                "--quick",
                "--findings",
                str(grid),
                "--circuit",
                str(circ),
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    html = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    sec7 = html[html.rindex("8. Circuit and findings") : html.rindex("9. Run facts")]  # past the table of contents
    assert "Findings grid (" in sec7 and "Path patching (" in sec7 and len(re.findall(r"<img", sec7)) >= 2
    assert f"--findings {grid} --circuit {circ}" in html
