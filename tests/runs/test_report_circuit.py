"""Section "Circuit and findings" of `mechicl report`: read from real `mechicl findings` and `mechicl circuit` folders
(organism-strong), every quoted number matching their CSVs; folders that cannot fill it are refused before any
forward. Without them: the report's own held-out path patching among the headline heads, on contexts whose rows no
finder draw used, and replication read from the committed grid cells."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from mechicl.cli import main
from mechicl.data.batches import used_rows
from mechicl.data.tasks import load_task
from mechicl.errors import ConfigError
from mechicl.models.loading import load_model
from mechicl.runs.report_circuit import (
    check_external,
    circuit_blocks,
    circuit_stage,
    findings_blocks,
    replication_blocks,
)
from mechicl.runs.report_data import ReportConfig
from mechicl.runs.report_headline import committed_replication
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
    blocks = findings_blocks(grid, "organism-strong") + circuit_blocks(circ)
    tables = [b for b in blocks if isinstance(b, Table)]
    assert len(tables) == 2 and any(isinstance(b, Figure) and b.path.name.startswith("circuit_") for b in blocks)
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


def test_without_a_grid_cell_replication_names_the_command():
    (note,) = replication_blocks(committed_replication(), "organism-strong", ["L0H2"])
    assert isinstance(note, Note) and "mechicl findings --models organism-strong" in note.text


def test_replication_reads_the_committed_cells_and_names_headline_heads_the_grid_never_validated():
    rep = committed_replication()
    (table,) = replication_blocks(rep, "gemma3-270m", ["L11H2", "L10H0"])
    h = rep.heads[rep.heads.model == "gemma3-270m"].set_index("head")
    shown = table.df.set_index("head")
    assert set(h.index[h.verdict == "replicates"]) | {"L10H0"} >= set(shown.index) >= {"L11H2"}
    assert shown.loc["L11H2", "above controls / voting cells"] == f"{h.n_above_control['L11H2']}/{h.n_cells['L11H2']}"
    assert shown.loc["L11H2", "headline head here"] == "yes" and shown.loc["L15H0", "headline head here"] == "no"
    assert "L10H0" not in h.index and "never validated in a voting grid cell: L10H0" in table.caption


def test_report_circuit_stage_measures_fresh_rows_and_matches_the_circuit_command(tmp_path):
    """The stage's contexts hold no row of the finder's draws, and its path effects equal `mechicl circuit` run
    pre-registered on the same heads with the same contexts (its own Patcher and tables)."""
    from mechicl.analysis.patching.exact import Patcher
    from mechicl.analysis.patching.paths import path_patch
    from mechicl.data.pairs import make_pair

    loaded, task = load_model("organism-strong"), load_task("organism")
    cfg = ReportConfig.sized("quick", model="organism-strong", task="organism")
    fc = cfg.heads()
    used = used_rows(task, fc.sizes, fc.k + 1, (cfg.seed,))
    c = circuit_stage(loaded, task, cfg, ["L1H1", "L0H2"], used)
    assert not set(c.example_ids.reshape(-1).tolist()) & used and c.n_contexts == cfg.n_circuit
    assert c.heads == ((0, 2), (1, 1)) and set(c.paths.positions) == set(cfg.circuit_positions)
    pair = make_pair(task, loaded.tokenizer, c.example_ids, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    ref = path_patch(Patcher(loaded.model, pair), [(0, 2), (1, 1)], [(1, 1)], "all").table()
    mine = c.paths[c.paths.positions == "all"].reset_index(drop=True)
    assert list(mine.receiver) == list(ref.receiver) and abs(mine.effect - ref.effect).max() < 1e-5


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
