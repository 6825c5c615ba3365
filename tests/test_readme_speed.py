"""The README's speed rows are copied from docs/speed.md's benchmark table (itself re-derived from the committed
benchmark rows by tests/test_docs.py): each row's two times, ratio and command number must be one row there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_speed_rows_are_rows_of_the_speed_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Speed") : readme.index("## Where to read more")]
    rows = re.findall(r"^\| [^|]+ \| [^|]+ \| ([\d.]+) s \| ([\d.]+) s \| ([\d.]+x) \| (\d+) \|$", section, re.M)
    assert len(rows) >= 4, section
    table = (ROOT / "docs" / "speed.md").read_text(encoding="utf-8")
    for mine, peer, ratio, cmd in rows:
        assert re.search(rf"\| {mine} \| {peer} \| \*\*{re.escape(ratio)}\*\* \|.*\| {cmd} \|$", table, re.M), (
            mine,
            peer,
            ratio,
            cmd,
        )
