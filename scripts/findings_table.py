"""Re-derive the findings tables in README.md and docs/grid.md from the committed per-cell results (issue 27, item 6).

    .venv/bin/python scripts/findings_table.py            # print both blocks
    .venv/bin/python scripts/findings_table.py --check    # exit 1 unless README.md and docs/grid.md hold them exactly
    .venv/bin/python scripts/findings_table.py --write    # replace the blocks in place (after new cells are committed)

Every number comes from ``docs/results/grid/cells/*/`` (the discovery grid) and ``docs/results/preregistered/cells``
(the pre-registered heads on fresh rows): each cell's cell.json and CSVs as `mechicl findings` sealed them
(effects, CIs, controls, roles; no task text), through the replication code the grid's summary and the report's
headline use (``runs.report_headline.committed_replication``). ``tests/test_findings_table.py`` runs ``--check``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mechicl.analysis.heads.replication import Replication
from mechicl.runs.findings_report import anchor_rows, cells_table, head_table
from mechicl.runs.markdown import md_table
from mechicl.runs.report_headline import committed_replication

ROOT = Path(__file__).resolve().parents[1]
GRID, PREREG = ROOT / "docs" / "results" / "grid", ROOT / "docs" / "results" / "preregistered"
BLOCKS = {  # marker: (the file that holds the block, the committed cells it is derived from, what it shows)
    "findings-table": (ROOT / "README.md", GRID, "heads"),
    "grid-cells": (ROOT / "docs" / "grid.md", GRID, "cells"),
    "grid-anchors": (ROOT / "docs" / "grid.md", GRID, "anchors"),
    "preregistered-table": (ROOT / "docs" / "grid.md", PREREG, "heads"),
}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}: scripts/findings_table.py -->", f"<!-- /{name} -->"


def replication(grid: Path) -> Replication:
    rep = committed_replication(grid)
    if rep is None:
        raise SystemExit(f"no committed cells under {grid / 'cells'}")
    return rep


def voting_line(rep: Replication) -> str:
    parts = [
        f"{model}: {int(g.votes.sum())} of {len(g)} cells vote ({int(g.has_effect.sum())} with a gap CI above 0)"
        for model, g in rep.cells.groupby("model", sort=False)
    ]
    return "Cells: " + "; ".join(parts) + "."


def block(name: str, rep: Replication) -> str:
    start, end = markers(name)
    what = BLOCKS[name][2]
    if what == "cells":
        return "\n".join([start, voting_line(rep), "", md_table(cells_table(rep)), end])
    if what == "anchors":
        return "\n".join([start, md_table(anchor_rows(rep)), end])
    t = head_table(rep)
    return "\n".join([start, voting_line(rep), "", md_table(t) if len(t) else "No head was validated.", end])


def check(name: str) -> str | None:
    """None when the file holds the block exactly, else what is wrong and the block to paste."""
    path, grid, _ = BLOCKS[name]
    want, (start, end), text = block(name, replication(grid)), markers(name), path.read_text(encoding="utf-8")
    if start not in text or end not in text:
        return f"{path.name} lacks the block {start} ... {end}; paste:\n{want}"
    got = text[text.index(start) : text.index(end) + len(end)]
    return None if got == want else f"{path.name}'s table differs from {grid}; paste:\n{want}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the files' blocks instead of printing")
    ap.add_argument("--write", action="store_true", help="replace the blocks in README.md and docs/grid.md")
    args = ap.parse_args()
    if args.write:
        for name, (path, grid, _) in BLOCKS.items():
            (start, end), text = markers(name), path.read_text(encoding="utf-8")
            if start not in text or end not in text:
                raise SystemExit(f"{path.name} lacks the block {start} ... {end}: add the two lines first")
            a, b = text.index(start), text.index(end) + len(end)
            path.write_text(text[:a] + block(name, replication(grid)) + text[b:], encoding="utf-8")
        return 0
    if not args.check:
        for name, (_, grid, _) in BLOCKS.items():
            print(block(name, replication(grid)) + "\n")
        return 0
    errors = [e for e in (check(n) for n in BLOCKS) if e]
    for e in errors:
        print(e, file=sys.stderr)
    if not errors:
        print("README.md and docs/grid.md match the committed cells")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
