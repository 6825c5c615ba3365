"""`mechicl circuit` end to end on the strong organism: held-out draws, every table, the circuit figure."""

from __future__ import annotations

import json

import pandas as pd

from mechicl.cli import main
from mechicl.data.tasks import load_task
from mechicl.models.loading import load_model
from mechicl.runs.circuit import CircuitConfig, run_circuit, significant_edges


def test_circuit_run_writes_every_table_and_figure(tmp_path):
    cfg = CircuitConfig("organism-strong", "organism", n_examples=6, n_select=4, n_eval=6, positions=("label",))
    folder, text = run_circuit(load_model("organism-strong"), load_task("organism"), cfg, tmp_path)
    for name in (
        "selection.csv",
        "resid_sets.csv",
        "head_parts.csv",
        "paths.csv",
        "circuit_label_frozen.png",
        "circuit_label_frozen.svg",
        "circuit_label_recomputed.svg",
        "paths_label_frozen_v.png",
        "summary.md",
    ):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "config.json").read_text())["seed_eval"] != cfg.seed_select
    paths = pd.read_csv(tmp_path / "paths.csv")
    assert set(paths["mlps"]) == {"frozen", "recomputed"} and (paths["n_contexts"] == 6).all()
    assert (paths["receiver_layer"].fillna(99) > paths["sender_layer"]).all()
    edges = significant_edges(paths, 0.01)
    assert ((edges["ci_low"] > 0) | (edges["ci_high"] < 0)).all() and (edges["effect"].abs() >= 0.01).all()
    assert "Senders: L0H0 L0H1 L0H2 L0H3" in text and "<svg" in (tmp_path / "circuit_label_frozen.svg").read_text()


def test_cli_refuses_selection_on_the_evaluation_draw(tmp_path, capsys):
    assert (
        main(
            [
                "circuit",
                "--model",
                "organism-strong",
                "--task",
                "organism",
                "--seed",
                "3",
                "--seed-eval",
                "3",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "seed-eval" in capsys.readouterr().err
    assert (
        main(
            [
                "circuit",
                "--model",
                "organism-strong",
                "--task",
                "organism",
                "--positions",
                "labels",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "--positions" in capsys.readouterr().err


def test_pre_registered_paths_skip_selection(tmp_path, capsys):
    out = tmp_path / "c"
    base = [
        "circuit",
        "--model",
        "organism-strong",
        "--task",
        "organism",
        "--k",
        "5",
        "--n-eval",
        "6",
        "--threads",
        "1",
    ]
    args = [*base, "--positions", "readout,label", "--sender-heads", "L0H2", "--receiver-heads", "L1H1", "--out"]
    assert main([*args, str(out)]) == 0
    paths = pd.read_csv(out / "paths.csv")
    assert set(paths.sender) == {"L0H2"} and set(paths.receiver.dropna()) == {"L1H1", "logits"}
    assert set(paths.positions) == {"readout", "label"} and not (out / "selection.csv").exists()
    assert "pre-registered" in (out / "summary.md").read_text()
    assert main([*base, "--sender-heads", "L0H2", "--out", str(tmp_path / "d")]) != 0
    assert "--receiver-heads" in capsys.readouterr().err
