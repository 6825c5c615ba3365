"""`runs.attribute` end to end on tiny: every table, plot and the offline view, with completeness that adds up."""

from __future__ import annotations

import json

import pandas as pd

from mechicl.runs.attribute import AttributeConfig, run_attribute
from tests.viz.test_views import EXTERNAL


def test_run_attribute_writes_tidy_tables_and_an_offline_view(tiny, toy, tmp_path):
    cfg = AttributeConfig(
        "tiny", "toy", n_contexts=2, n_examples=4, steps=5, completeness_steps=(1, 20), top=4, view_heads=2
    )
    folder, text = run_attribute(tiny, toy, cfg, tmp_path / "att")
    names = {p.name for p in folder.path.iterdir()}
    assert {
        "attattr_groups.csv",
        "path_ig_completeness.csv",
        "ranking.csv",
        "costs.csv",
        "attribution_view.html",
        "attribution_label_vs_input.png",
        "summary.md",
        "config.json",
    } <= names
    comp = pd.read_csv(folder.path / "path_ig_completeness.csv")
    assert sorted(comp.steps.unique()) == [1, 5, 20]
    worst = comp.assign(r=comp.residual.abs()).groupby("steps").r.max()
    assert worst[20] < worst[1] and worst[20] < 1e-3
    groups = pd.read_csv(folder.path / "attattr_groups.csv")
    assert (
        set(groups.condition) == {"correct", "flipped"} and len(groups) == 2 * 2 * 4 * 6
    )  # cond x layer x head x group
    ranking = pd.read_csv(folder.path / "ranking.csv")
    assert list(ranking.method) == ["path IG (m=5)", "first-order"] and ranking.spearman.between(-1, 1).all()
    page = (folder.path / "attribution_view.html").read_text()
    assert not EXTERNAL.search(page) and "attribution" in page
    assert json.loads((folder.path / "config.json").read_text())["steps"] == 5
    assert "Path IG completeness" in text and "## Cost" in text
