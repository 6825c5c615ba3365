"""`mechicl behavior` on an organism: the exact Bayes-optimal reader beside the measured curves (bayes.csv)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mechicl.cli import main
from mechicl.models.organism import checkpoint_path, organism_config
from tests.runs.test_outputs_doc import _columns, _file_patterns, _sections


def _hand_accuracy(condition: str, k: int, p: tuple[float, float, float], eps: float) -> float:
    """Bayes decision by hand: default vs flipped log-odds after k labels shown under ``condition``
    (the arbitrary maps give the sentiment words probability 0 once a sentiment label is shown)."""
    p_d, p_f, _ = p
    log_odds = math.log(p_d / p_f) + (1 if condition == "default" else -1) * k * math.log((1 - eps) / eps)
    if condition == "default":
        return 1.0 if log_odds > 0 else 0.5 if log_odds == 0 else 0.0
    return 1.0 if log_odds < 0 else 0.5 if log_odds == 0 else 0.0


def test_behavior_on_an_organism_writes_the_bayes_curve_and_distance(tmp_path, capsys):
    out = tmp_path / "b"
    args = [
        "behavior",
        "--model",
        str(checkpoint_path("organism-strong")),
        "--task",
        "organism",
        "--conditions",
        "default,flipped,arbitrary:a/b,random",
        "--k",
        "4",
        "--n-contexts",
        "8",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    capsys.readouterr()
    bayes, summary = pd.read_csv(out / "bayes.csv"), pd.read_csv(out / "summary.csv")
    assert (out / "accuracy.png").stat().st_size > 0 and "Bayes-optimal" in (out / "summary.md").read_text()
    section = _sections()["behavior"]  # the file and every column are documented
    assert any(p.match("bayes.csv") for p in _file_patterns(section))
    assert set(bayes.columns) <= _columns(section)["bayes.csv"]
    acc = summary[summary.metric == "accuracy"].set_index(["condition", "k"])["mean"]
    assert np.allclose(bayes.set_index(["condition", "k"])["organism"], acc.loc[list(zip(bayes.condition, bayes.k))])
    assert np.allclose(bayes["distance"], bayes["organism"] - bayes["bayes_accuracy"])
    assert set(bayes.condition) == {"default", "flipped", "arbitrary:a/b", "random"} and set(bayes.k) == set(range(5))
    lang = organism_config("organism-strong").language
    for cond in ("default", "flipped"):
        got = bayes[bayes.condition == cond].set_index("k")["bayes_accuracy"]
        want = [_hand_accuracy(cond, k, lang.map_probs, lang.label_noise) for k in got.index]
        assert np.allclose(got.to_numpy(), want), (cond, got.tolist(), want)
    assert bayes.set_index(["condition", "k"]).loc[("flipped", 2), "bayes_accuracy"] == 1.0  # two labels beat the prior


def test_no_bayes_curve_for_models_without_a_known_language(tmp_path, capsys):
    out = tmp_path / "t"
    assert (
        main(
            [
                "behavior",
                "--model",
                "tiny",
                "--task",
                "toy",
                "--k",
                "2",
                "--n-contexts",
                "2",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert not (out / "bayes.csv").exists() and (out / "accuracy.png").exists()
    assert organism_config("tiny") is None and organism_config("organism-strong") is not None
