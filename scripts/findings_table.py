"""Re-derive the README's head-level findings table from the committed per-cell results (issue 27, item 6).

    .venv/bin/python scripts/findings_table.py            # print the table from docs/results/grid/cells
    .venv/bin/python scripts/findings_table.py --check    # exit 1 unless README.md holds exactly that table

Every number comes from ``docs/results/grid/cells/*/`` (each cell's cell.json and CSVs, as `mechicl findings`
sealed them: effects, CIs, controls, roles; no task text) through the same replication code the grid's summary
uses (``runs.report_headline.committed_replication``, the report's headline reads the same). ``tests/test_findings_table.py`` runs ``--check``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from mechicl.analysis.heads.replication import Replication
from mechicl.runs.findings_report import head_table
from mechicl.runs.markdown import md_table
from mechicl.runs.report_headline import committed_replication

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "docs" / "results" / "grid"
START, END = "<!-- findings-table: scripts/findings_table.py -->", "<!-- /findings-table -->"


def replication() -> Replication:
    rep = committed_replication(GRID)
    if rep is None:
        raise SystemExit(f"no committed cells under {GRID / 'cells'}")
    return rep


def voting_line(rep: Replication) -> str:
    c = rep.cells
    parts = []
    for model, g in c.groupby("model", sort=False):
        parts.append(
            f"{model}: {int(g.votes.sum())} of {len(g)} cells vote ({int(g.has_effect.sum())} with a gap CI above 0)"
        )
    return "Cells: " + "; ".join(parts) + "."


def table_markdown(rep: Replication) -> str:
    t = head_table(rep)
    if not len(t):
        return "No head was validated in a voting cell."
    return md_table(t)


def block(rep: Replication) -> str:
    return "\n".join([START, voting_line(rep), "", table_markdown(rep), END])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with README.md's block instead of printing")
    args = ap.parse_args()
    want = block(replication())
    if not args.check:
        print(want)
        return 0
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    if START not in readme or END not in readme:
        print(f"README.md lacks the block {START} ... {END}", file=sys.stderr)
        return 1
    got = readme[readme.index(START) : readme.index(END) + len(END)]
    if got != want:
        print(
            "README.md's findings table differs from the committed cells; paste this block:\n" + want, file=sys.stderr
        )
        return 1
    print("README.md's findings table matches docs/results/grid/cells")
    return 0


if __name__ == "__main__":
    pd.set_option("display.width", 200)
    sys.exit(main())
