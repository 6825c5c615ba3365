"""`mechicl run` keeps the config as it was when the run started, not as edited while it ran."""

from __future__ import annotations

from pathlib import Path

from mechicl.cli import main
from mechicl.runs import run as R

NH3 = Path(__file__).resolve().parents[2] / "experiments" / "nh3_label_switch.toml"


def test_the_run_folder_keeps_the_config_as_it_ran(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    original = NH3.read_text(encoding="utf-8")
    cfg.write_text(original, encoding="utf-8")
    real = R.run_experiment

    def edited_meanwhile(*args, **kwargs):
        cfg.write_text(original.replace("n_contexts = 256", "n_contexts = 999"), encoding="utf-8")
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "run_experiment", edited_meanwhile)
    argv = ["run", str(cfg), "--model", "tiny", "--task", "toy", "--n-contexts", "4", "--threads", "1"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "config.toml").read_text(encoding="utf-8") == original
