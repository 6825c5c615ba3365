"""Section 1 of `mechicl report`, the headline: which heads carry the in-context label information on this model
and task, what role each plays, how large its effect is against matched controls, and whether it replicates.

The heads and their effects come from the report's own held-out finder cell (section "Validation": one
`mechicl heads` cell, interchange at the readout slots, roles from ``analysis.heads.roles``). Replication is read
from the committed per-cell grid results (``docs/results/grid/cells``, the same files ``scripts/findings_table.py``
re-derives the README's table from), or from a fresh grid given with ``--findings``. Every number is read from
those tables; nothing is recomputed here."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mechicl.analysis.heads.replication import Replication, replicate
from mechicl.runs.findings import read_cell
from mechicl.runs.report_data import ReportData
from mechicl.viz.report_html import Figure, Note, Section, Table
from mechicl.viz.table_words import ci_text

GRID_RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "grid"

HOW_TO_READ = (
    "How to read: each row is a head that the held-out finder validated on this model and task (section "
    "Validation). Label information is the share of the correct-vs-flipped gap in P(true) that swapping the "
    "head's output between the two label conditions removes (2 = the gap reversed); its role comes from that, "
    "from ablating it in each condition and at zero shot; replication counts the committed grid's cells."
)


def committed_replication(folder: Path = GRID_RESULTS) -> Replication | None:
    """The replication tables of the grid cells under ``folder/cells`` (None when there are none)."""
    cells = folder / "cells"
    found = sorted(p for p in cells.iterdir() if (p / "cell.json").is_file()) if cells.is_dir() else []
    return replicate([read_cell(p) for p in found]) if found else None


def _ci(m: float, lo: float, hi: float, d: int = 2) -> str:
    return ci_text(m, lo, hi, d, signed=True)


def _grid_rows(rep: Replication | None, model: str) -> tuple[dict[str, str], str]:
    if rep is None or not (rep.cells.model == model).any():
        return (
            {},
            f"The committed grid has no cell of {model}: run `mechicl findings --models {model}` for replication.",
        )
    cells = rep.cells[rep.cells.model == model]
    h = rep.heads[rep.heads.model == model] if len(rep.heads) else rep.heads
    text = {
        r["head"]: f"{r.verdict} ({r.n_above_control}/{r.n_cells} voting cells; role there: {r.role or 'n/a'})"
        for _, r in h.iterrows()
    }
    tasks = ", ".join(dict.fromkeys(cells.task))
    return text, f"Grid: {len(cells)} cells of {model} ({tasks}), {int(cells.votes.sum())} voting."


def headline_table(d: ReportData, rep: Replication | None) -> pd.DataFrame:
    """One row per head the finder validated (none without an in-context effect): role, label information with its
    CI, matched controls, zero-shot effect and the grid's verdict, as the reader sees them (written as headline.csv)."""
    if not d.heads.has_effect:
        return pd.DataFrame()
    grid, _ = _grid_rows(rep, d.config.model)
    v = d.heads.validate
    return pd.DataFrame(
        {
            "head": v.heads,
            "role": v.role,
            "label information (interchange) [95% CI]": [
                _ci(*x) for x in zip(v.interchange, v.interchange_ci_low, v.interchange_ci_high)
            ],
            "its matched controls (mean)": v.control_mean.map(lambda x: f"{x:+.2f}"),
            "above its controls": v.above_control.map({True: "yes", False: "no"}),
            "zero-shot ΔP(true) [95% CI]": [
                _ci(*x, 3) for x in zip(v.d_p_zero_shot, v.d_p_zero_shot_ci_low, v.d_p_zero_shot_ci_high)
            ],
            "across tasks and seeds": [grid.get(h, "not validated in a voting grid cell") for h in v.heads],
        }
    ).reset_index(drop=True)


def headline_section(d: ReportData, rep: Replication | None) -> Section:
    """The headline table from the report's finder cell and the grid's replication."""
    r, model = d.heads, d.config.model
    _, grid_note = _grid_rows(rep, model)
    if not r.has_effect:
        b = r.baseline
        return Section(
            "Headline",
            (
                Note(
                    f"On this model and task the correct-vs-flipped gap in P(true) is "
                    f"{_ci(b['gap'], b['gap_ci_low'], b['gap_ci_high'], 3)}: its CI does not lie above 0, so no head "
                    f"is named ({r.verdict}). {grid_note}"
                ),
            ),
        )
    v = r.validate
    labels = list(v.heads[(v.role == "label") & v.above_control])
    lead = (
        f"Label heads on {model} / {d.config.task}: {', '.join(labels)}."
        if labels
        else f"No validated head on {model} / {d.config.task} is a pure label head (see the roles)."
    )
    return Section("Headline", (Table(headline_table(d, rep), f"{lead} {r.verdict}. {grid_note}"),))


def with_competition(headline: Section, body: Sequence[Section]) -> Section:
    """The headline with the "Prior vs context" section's competition figure (who wins, per prior bin and k), the
    same PNG, so the top of the page says how the named heads meet the prior (unchanged where there is none)."""
    prior = [s for s in body if s.title == "Prior vs context"]
    figs = [b for s in prior for b in s.blocks if isinstance(b, Figure)][:1]
    if not figs:
        return headline
    f = figs[0]
    return dataclasses.replace(
        headline, blocks=(*headline.blocks, Figure(f.path, f"{f.caption} (Section 'Prior vs context'.)"))
    )
