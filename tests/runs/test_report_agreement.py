"""Each report section read against the headline (``runs.report_agreement``): the finder's verdict on any head is
its own tables' verdict, and a section's line quotes the headline heads' values from that section's table."""

from __future__ import annotations

import pandas as pd
import pytest

from mechicl.data.tasks import load_task
from mechicl.models.loading import load_model
from mechicl.runs.heads import find_heads_for
from mechicl.runs.report_agreement import _standing, _top_other, finder_status
from mechicl.runs.report_data import ReportConfig, headline_heads


@pytest.fixture(scope="module")
def cell():
    cfg = ReportConfig.sized("quick", model="organism-strong", task="organism")
    return find_heads_for(load_model("organism-strong"), load_task("organism"), cfg.heads(), progress=False)


def test_finder_status_follows_the_finders_tables(cell):
    v, c, s = cell.validate, cell.confirm, cell.screen
    names = [f"L{int(l)}H{int(h)}" for l, h in zip(s.layer, s["head"])]
    for name in names:
        text = finder_status(name, cell)
        if name in set(v.heads):
            above = bool(v[v.heads == name].above_control.iloc[0])
            assert text.startswith("validated") and ("not above" not in text) == above
        elif name in set(c.heads):
            assert text.startswith(f"confirmed at rank {int(c[c.heads == name]['rank'].iloc[0])}")
        else:
            rank = int(s.screen_rank[[n == name for n in names]].iloc[0])
            assert text.startswith(f"screened at rank {rank} of {len(s)}")
    assert headline_heads(cell) == list(v.heads[v.above_control])


def test_a_top_head_outside_the_headline_is_named_with_the_finders_verdict(cell):
    named = headline_heads(cell)
    values = pd.Series({"L0H0": 0.9, "L1H1": -0.2, **{n: 0.1 for n in named}})
    line = _top_other(values, named, cell, "top cell")
    if "L0H0" not in named:
        assert line.startswith(" The top cell is L0H0 (+0.90), not a headline head: the finder ")
        assert finder_status("L0H0", cell) in line
    ranks = _standing(values, named)
    assert all(f"{n} +0.10 (rank" in ranks for n in named)
