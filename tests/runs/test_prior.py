"""`mechicl prior` on an organism: the table, the figures and the summary; bad head names name the fix."""

from __future__ import annotations

import pandas as pd
import pytest

from mechicl.cli import main
from mechicl.errors import ConfigError
from mechicl.runs.prior import head_sets, k_bands, prior_spec

ORG = ["--model", "organism-strong", "--task", "organism", "--threads", "1", "--k", "8", "--k-min", "1"]


def test_prior_writes_a_table_per_bin_and_k_and_the_figures(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["prior", *ORG, "--n-contexts", "16", "--heads", "L1H1;L0H0,L0H2", "--out", str(out)]) == 0
    tab = pd.read_csv(out / "prior.csv")
    assert set(tab.heads) == {"L1H1", "L0H0 L0H2"}
    assert set(zip(tab.k_lo, tab.k_hi)) <= set(k_bands(1, 8))
    for heads, g in tab.groupby("heads"):  # every slot k = 1..8 of every context is in exactly one bin
        assert g.n_slots.sum() == 16 * 8, heads
    assert (out / "prior_sides.png").is_file() and (out / "prior_heads_L1H1.png").is_file()
    assert (out / "prior_competition.png").is_file()
    routes = pd.read_csv(out / "routes.csv")
    assert set(routes.route) == {
        "labels",
        "query",
        "rest",
        "all",
        "interaction",
        "labels via L1H1",
        "labels via L0H0 L0H2",
    }
    pooled = routes[(routes.prior_bin == "all") & (routes.route == "all")]
    assert ((pooled.share - 1).abs() < 1e-3).all()  # the 'all' route is the flipped run itself
    labels = routes[routes.route == "labels"]
    assert labels[labels.prior_bin == "all"].n_slots.sum() == 16 * 8  # every slot k = 1..8 of every context
    assert labels[labels.prior_bin != "all"].n_slots.sum() <= 16 * 8  # at most once over the prior bins
    assert "Routes into the readout slot" in (out / "summary.md").read_text()
    dose = pd.read_csv(out / "dose.csv")  # both label sets, every band, the six default scales
    assert set(dose.heads) == {"L1H1", "L0H0 L0H2"} and set(dose.kind) == {"label"}
    assert dose.groupby(["heads", "k_lo"]).scale.apply(list).map(len).eq(6).all()
    assert "bayes_flip" in dose and (out / "prior_dose.png").is_file()


def test_prior_heads_are_found_and_validated_on_a_constructed_organism(tmp_path):
    """Ground truth from the recipe: constructed's prior carrier is L0H2; the finder selects it on two draws,
    validates it on the third, and the dose scales its output."""
    out = tmp_path / "c"
    args = ["prior", "--model", "constructed", "--task", "organism", "--threads", "1", "--k", "6", "--k-min", "1"]
    assert main([*args, "--n-contexts", "16", "--heads", "L1H2", "--prior-heads", "find;L0H1", "--out", str(out)]) == 0
    val = pd.read_csv(out / "prior_heads.csv")
    assert set(val.heads[val.prior_head]) == {"L0H2"}
    assert val.set_index("heads").selected_by.to_dict() == {"L0H2": "finder", "L0H1": "named"}
    dose = pd.read_csv(out / "dose.csv")  # the named head gets its dose whatever its verdict
    assert set(zip(dose.heads, dose.kind)) == {("L1H2", "label"), ("L0H2", "output"), ("L0H1", "output")}
    assert "Prior heads (validated on the third draw)" in (out / "summary.md").read_text()
    assert "zero-shot log-odds" in (out / "summary.md").read_text()


def test_head_sets_parse_and_bad_names_name_the_fix(capsys):
    assert head_sets("L1H1; L0H0,L0H2", 2, 4) == [[(1, 1)], [(0, 0), (0, 2)]]
    with pytest.raises(ConfigError, match="not in this model"):
        head_sets("L5H0", 2, 4)
    with pytest.raises(ConfigError, match="names no head"):
        head_sets(" ; ", 2, 4)
    assert main(["prior", *ORG]) != 0  # --heads is required: an error naming the flag, no traceback
    assert "--heads is required" in capsys.readouterr().err
    assert prior_spec("find; L0H1", 2, 4) == (True, [(0, 1)]) and prior_spec("", 2, 4) == (False, [])
    assert main(["prior", *ORG, "--heads", "L1H1", "--prior-heads", "find;L9H0"]) != 0  # before any compute
    assert "not in this model" in capsys.readouterr().err
