"""Replication verdicts: every rule on hand-made cells (which cells vote, what counts as above control, where
medians and roles come from), checked against counts written out by hand."""

from __future__ import annotations

import pandas as pd
import pytest

from mechicl.analysis.heads.replication import MIN_GAP, NOT_ROBUST, REPLICATES, TOO_FEW, CellTables, replicate, verdict


def _cell(task, seed, gap, heads, model="m", has_effect=True, preregistered=False):
    """``heads``: {name: (effect, above_control, role)} validated in this cell."""
    rows = [
        {
            "layer": int(n[1:].split("H")[0]),
            "head": int(n.split("H")[1]),
            "effect": e,
            "effect_ci_low": e - 0.1,
            "above_control": a,
            "control_mean": 0.0,
            "role": r,
        }
        for n, (e, a, r) in heads.items()
    ]
    screen = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "effect": [0.1, 0.2, 0.3, 0.4]})
    return CellTables(
        model,
        task,
        seed,
        has_effect,
        {"gap": gap, "gap_ci_low": gap / 2},
        screen,
        pd.DataFrame(rows),
        preregistered=preregistered,
    )


@pytest.mark.parametrize(
    "per_task, n_above, n_cells, want",
    [
        ({"a": (2, 3), "b": (2, 3)}, 4, 6, REPLICATES),  # 4 >= 2/3 * 6
        ({"a": (3, 3), "b": (0, 3)}, 3, 6, "task-specific: a"),
        ({"a": (2, 2), "b": (2, 2), "c": (0, 4)}, 4, 8, "task-specific: a, b"),
        ({"a": (1, 1), "b": (0, 5)}, 1, 6, NOT_ROBUST),  # one cell of a task is not a task-specific finding
        ({"a": (1, 3), "b": (1, 3)}, 2, 6, NOT_ROBUST),
        ({}, 0, 0, TOO_FEW),
        ({"a": (1, 1), "b": (1, 1)}, 2, 2, TOO_FEW),  # 2 of 2 is too little to call replication
        ({"a": (2, 2), "b": (1, 1)}, 3, 3, REPLICATES),
    ],
)
def test_verdict_rules(per_task, n_above, n_cells, want):
    assert verdict(per_task, n_above, n_cells) == want


def test_only_cells_with_a_large_enough_gap_vote():
    cells = [
        _cell("a", 0, 0.20, {"L1H1": (1.0, True, "label")}),
        _cell("a", 1, 0.20, {"L1H1": (0.8, True, "label")}),
        _cell("c", 0, 0.20, {"L1H1": (0.9, True, "label")}),
        _cell("b", 0, MIN_GAP / 2, {"L0H1": (0.5, False, "class")}),  # too small a gap: does not vote
        _cell("b", 1, 0.30, {"L1H1": (0.2, False, "label+prior")}, has_effect=False),  # no effect: does not vote
    ]
    rep = replicate(cells)
    assert list(rep.cells.votes) == [True, True, True, False, False]
    h = rep.heads.set_index("head")
    assert list(h.index) == ["L1H1"]  # L0H1 was validated only in a cell that does not vote
    assert h.loc["L1H1", "n_cells"] == 3 and h.loc["L1H1", "n_above_control"] == 3
    assert h.loc["L1H1", "verdict"] == REPLICATES and h.loc["L1H1", "effect_median"] == pytest.approx(0.9)
    assert replicate(cells, min_gap=0.0).heads.set_index("head").loc["L1H1", "n_cells"] == 4


def test_discovery_counts_unselected_cells_against_a_head_and_medians_use_tested_cells_only():
    cells = [
        _cell("a", 0, 0.2, {"L1H1": (1.0, True, "label"), "L1H0": (0.1, False, "generic")}),
        _cell("a", 1, 0.2, {"L1H1": (0.6, True, "label+prior")}),
        _cell("b", 0, 0.2, {"L1H0": (0.3, True, "class")}),  # L1H1 not selected here
        _cell("b", 1, 0.2, {"L1H1": (0.2, False, "label")}),
    ]
    h = replicate(cells).heads.set_index("head")
    assert h.loc["L1H1", "n_tested"] == 3 and h.loc["L1H1", "n_cells"] == 4 and h.loc["L1H1", "n_above_control"] == 2
    assert h.loc["L1H1", "verdict"] == "task-specific: a"  # 2/4 < 2/3 across; 2/2 on task a
    assert h.loc["L1H1", "effect_median"] == pytest.approx(0.6)  # over the three tested cells, not four
    assert h.loc["L1H1", "role"] == "label" and h.loc["L1H1", "roles"] == "label 2; label+prior 1"
    assert h.loc["L1H1", "design"] == "discovery"
    tied = [_cell("a", s, 0.2, {"L1H1": (1.0, True, r)}) for s, r in enumerate(["label+prior", "label", "label"])]
    tied.append(_cell("b", 0, 0.2, {"L1H1": (1.0, True, "label+prior")}))
    assert replicate(tied).heads.set_index("head").loc["L1H1", "role"] == "label / label+prior"  # a tie is shown


def test_preregistered_cells_test_every_head_everywhere():
    named = {"L1H1": (0.5, True, "label"), "L0H0": (0.0, False, "generic")}
    cells = [_cell(t, s, 0.2, named, preregistered=True) for t in ("a", "b") for s in (0, 1)]
    h = replicate(cells).heads.set_index("head")
    assert (h.design == "pre-registered").all() and (h.n_tested == h.n_cells).all()
    assert h.loc["L1H1", "verdict"] == REPLICATES and h.loc["L0H0", "verdict"] == NOT_ROBUST
