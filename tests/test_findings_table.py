"""The README's and docs/grid.md's findings tables are re-derived from the committed per-cell results
(scripts/findings_table.py), so every number in them can be recomputed by a reader; the check can fail."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests import helpers

ROOT = Path(__file__).resolve().parents[1]


def _module():
    return helpers.script("findings_table")[0]


def test_the_tables_match_the_committed_cells():
    helpers.script_check("findings_table")


def test_a_changed_number_or_a_missing_block_fails(tmp_path, monkeypatch):
    mod = _module()
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = mod.markers("findings-table")
    block = text[text.index(start) : text.index(end)]
    row = next(line for line in block.splitlines() if line.startswith("| gemma3-270m"))
    readme.write_text(text.replace(row, row.replace("|", "| 9", 1)), encoding="utf-8")
    grid = tmp_path / "grid"
    shutil.copytree(ROOT / "docs" / "results" / "grid", grid)
    monkeypatch.setitem(mod.BLOCKS, "findings-table", (readme, grid, "heads"))
    assert "differs" in mod.check("findings-table")
    readme.write_text(text.replace(start, ""), encoding="utf-8")
    assert "lacks the block" in mod.check("findings-table")
