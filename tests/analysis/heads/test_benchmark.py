"""The ground-truth benchmark: the scorer against hand-counted precision / recall / role flags, the summary's
means and organism-bootstrap CIs against a plain loop, the ground truth read from construction and from the
pruning mask, and one end-to-end run on two organisms with tiny sizes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mechicl.analysis.heads.benchmark import (
    METHODS,
    Organism,
    Sizes,
    Truth,
    build_suite,
    constructed_truth,
    score_methods,
    score_selection,
    summary,
    top_n,
    trained_truth,
)
from mechicl.analysis.heads.finder import FindingsConfig
from mechicl.analysis.stats import bootstrap_indices
from mechicl.data.tasks import load_task
from mechicl.models.loading import load_model

TRUTH = Truth(
    label_heads=("L1H1", "L1H2"),
    class_heads=("L0H0", "L0H1"),
    prior_carriers=("L0H2",),
    inert_heads=("L1H0", "L1H3"),
)


def _brute(selected, truth):
    """Precision / recall counted head by head."""
    hits = sum(1 for x in set(selected) if x in truth.label_heads)
    prec = hits / len(set(selected)) if selected else math.nan
    return prec, hits / len(truth.label_heads)


@pytest.mark.parametrize(
    "selected",
    [["L1H1"], ["L1H1", "L1H2"], ["L0H1", "L1H2"], ["L0H0", "L0H2", "L1H3"], [], ["L1H2", "L0H1", "L1H0", "L1H1"]],
)
def test_score_selection_equals_hand_counts(selected):
    s = score_selection(selected, TRUTH)
    prec, rec = _brute(selected, TRUTH)
    assert (math.isnan(s["precision"]) and math.isnan(prec)) or s["precision"] == pytest.approx(prec)
    assert s["recall"] == pytest.approx(rec)
    sel = set(selected)
    assert s["selected_class_head"] == bool(sel & {"L0H0", "L0H1"})
    assert s["selected_prior_carrier"] == ("L0H2" in sel)
    assert s["selected_inert_head"] == bool(sel & {"L1H0", "L1H3"})
    assert s["selected_non_label"] == bool(sel & {"L0H0", "L0H1", "L0H2"})
    assert s["selected_label_mover"] is False and s["non_label_known"] is True


def test_fixed_examples():
    assert score_selection(["L0H1", "L1H2"], TRUTH)["precision"] == 0.5
    assert score_selection(["L0H1", "L1H2"], TRUTH)["recall"] == 0.5
    assert score_selection(["L1H1", "L1H2"], TRUTH)["precision"] == 1.0
    assert score_selection(["L1H0"], Truth(label_heads=("L1H1",), inert_heads=("L1H0",)))["non_label_known"] is False


def test_top_n_picks_the_largest_signed_scores():
    s = np.array([[0.1, -3.0, 0.5], [np.nan, 2.0, 0.4]])
    assert top_n(s, 1) == ["L1H1"] and top_n(s, 3) == ["L1H1", "L0H2", "L1H2"]


def test_summary_equals_a_plain_loop_over_organisms():
    rng = np.random.default_rng(0)
    rows = pd.DataFrame(
        {
            "method": ["a"] * 6 + ["b"] * 6,
            "precision": np.r_[rng.random(5), np.nan, rng.random(6)],
            "recall": rng.random(12),
            "n_selected": [1, 2, 1, 1, 2, 0] + [1] * 6,
            "non_label_known": [True, False] * 6,
            "selected_non_label": [True, False, False, False, True, False] * 2,
            "selected_inert_head": [False] * 11 + [True],
        }
    )
    tab = summary(rows, n_boot=200, seed=3).set_index("method")
    for m, g in rows.groupby("method"):
        for col, x in (("precision", g.precision.dropna().to_numpy()), ("recall", g.recall.to_numpy())):
            boot = x[bootstrap_indices(len(x), 200, 3)].mean(-1)
            assert tab.loc[m, col] == pytest.approx(x.mean())
            assert tab.loc[m, f"{col}_ci_low"] == pytest.approx(np.percentile(boot, 2.5))
            assert tab.loc[m, f"{col}_ci_high"] == pytest.approx(np.percentile(boot, 97.5))
        assert tab.loc[m, "empty_rate"] == pytest.approx((g.n_selected == 0).mean())
        assert tab.loc[m, "non_label_rate"] == pytest.approx(g[g.non_label_known].selected_non_label.mean())
        assert tab.loc[m, "inert_rate"] == pytest.approx(g.selected_inert_head.mean())


TINY = Sizes(
    k=8,
    n_pair=8,
    n_check=12,
    finder=FindingsConfig(
        k=8,
        k_min=4,
        n_screen=4,
        n_confirm=6,
        n_validate=12,
        n_candidates=3,
        n_top=2,
        n_control=2,
        n_boot=100,
        n_perm=100,
    ),
    ig_steps=4,
    n_boot=100,
)


@pytest.fixture(scope="module")
def task():
    return load_task("organism")


def test_ground_truth_comes_from_construction_and_the_pruning_mask():
    t = constructed_truth("constructed-two-readers")
    assert t.label_heads == ("L1H1", "L1H2") and "L0H1" in t.class_heads and t.prior_carriers == ("L0H2",)
    strong = trained_truth(load_model("organism-strong"))
    assert strong.label_heads == ("L1H1",) and strong.inert_heads == ("L1H0", "L1H2", "L1H3")
    assert trained_truth(load_model("organism-strong-unpruned")).inert_heads == ()


def test_end_to_end_on_two_organisms(task):
    """Every method runs and is scored on a constructed and a trained organism; the unpruned one is excluded.
    Exact readout-slot patching ranks the planted reader first on both (its output at the readout slot is
    what carries the labels there)."""
    names = ("constructed", "organism-strong", "organism-strong-unpruned")
    suite, check = build_suite({n: load_model(n) for n in names}, task, TINY)
    assert [o.name for o in suite] == ["constructed", "organism-strong"]
    assert check.set_index("organism").loc["organism-strong-unpruned", "excluded"].startswith("not pruned")
    assert (check.gap_ci_low > 0).all()
    rows = score_methods(suite, task, TINY)
    assert len(rows) == 2 * len(METHODS) and set(rows.method) == set(METHODS)
    readout = rows[rows.method == "patch head_out_readout"].set_index("organism")
    assert readout.loc["constructed", "selected"] == "L1H2" and readout.loc["organism-strong", "selected"] == "L1H1"
    for _, r in rows.iterrows():  # the stored scores are the scorer's on the stored selection
        truth = next(o.truth for o in suite if o.name == r.organism)
        s = score_selection([x for x in r.selected.split(",") if x], truth)
        assert s["recall"] == r.recall and s["hits"] == r.hits
    tab = summary(rows, n_boot=100)
    assert set(tab.method) == set(METHODS) and tab.recall.between(0, 1).all()
    assert isinstance(suite[0], Organism) and suite[0].truth.label_heads == ("L1H2",)
