"""The README's report block (screenshot run, command, headline table) is re-derived from the committed run files
in docs/results/report/ (scripts/readme_report.py); a changed number or a missing block fails the check."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from tests import helpers

ROOT = Path(__file__).resolve().parents[1]


def _module():
    return helpers.script("readme_report")[0]


def test_the_readme_block_matches_the_committed_run():
    helpers.script_check("readme_report")
    assert (ROOT / "docs" / "img" / "report_top.png").stat().st_size > 10_000  # the screenshot the README shows


def test_a_changed_number_or_a_missing_block_fails(tmp_path):
    mod = _module()
    results = tmp_path / "report"
    shutil.copytree(ROOT / "docs" / "results" / "report", results)
    head = pd.read_csv(results / "headline.csv", dtype=str)
    first = head.columns[2]
    head.loc[0, first] = "+9.99 [+9.00, +9.99]"
    head.to_csv(results / "headline.csv", index=False)
    assert "differs" in mod.check(ROOT / "README.md", results)
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text(encoding="utf-8").replace(mod.START, ""), encoding="utf-8")
    assert "lacks the block" in mod.check(readme, ROOT / "docs" / "results" / "report")
