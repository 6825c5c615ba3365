from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mechicl.cli import main
from mechicl.errors import ConfigError
from mechicl.runs.experiments import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "experiments").glob("*.toml"))


def test_all_four_questions_have_configs():
    assert {p.stem for p in CONFIGS} >= {"nh1_random_labels", "nh2_flipped_arbitrary", "nh2_instructions", "nh3_label_switch"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_on_tiny_model_and_writes_every_output(path, tmp_path, capsys):
    out = tmp_path / path.stem
    # toy: the tiny model's word tokenizer reads it (vader-words would be all <unk>, which stops a run)
    assert main(["run", str(path), "--model", "tiny", "--task", "toy", "--n-contexts", "4", "--out", str(out)]) == 0
    cfg = load_config(path)
    for name in ["raw.csv", "summary.csv", "tests.csv", "verdict.md", "config.toml"]:
        assert (out / name).stat().st_size > 0
    for metric in cfg.plot_metrics:
        assert (out / f"{metric}.png").stat().st_size > 0
    tests = pd.read_csv(out / "tests.csv")
    assert set(tests.test) == set(range(len(cfg.tests)))
    s = pd.read_csv(out / "summary.csv")
    assert set(s.condition) == {c.name for c in cfg.conditions}
    assert f"# {cfg.hypothesis}:" in (out / "verdict.md").read_text()


def test_instruction_prefix_reaches_the_prompt(tiny):
    from mechicl.data.prompts import build_prompt_batch, sample_contexts
    from mechicl.data.tasks import load_task

    cfg = load_config(Path(__file__).resolve().parents[2] / "experiments" / "nh2_instructions.toml")
    cond = next(c for c in cfg.conditions if c.name == "flipped+instruct")
    task = load_task("toy")
    b = build_prompt_batch(task, tiny.tokenizer, sample_contexts(task, 2, 3), cond, n_ctx=512, prepend_bos=True)
    assert b.texts[0].startswith("In the following, negative means positive and positive means negative.\n\n")
    assert b.condition == "flipped+instruct" and (b.shown_labels != b.true_labels).all()


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


BASE = 'name = "x"\nhypothesis = "NH1"\nstatement = "s"\n[[conditions]]\nlabels = "default"\n[[conditions]]\nlabels = "random"\n'


def test_bad_config_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['n_context'\]"):
        load_config(_write(tmp_path, 'n_context = 3\n' + BASE + '[[tests]]\na = "default/accuracy"\nb = "random/accuracy"\n'))
    with pytest.raises(ConfigError, match=r"\[\[tests\]\] #1: unknown key\(s\) \['alpha'\]"):
        load_config(_write(tmp_path, BASE + '[[tests]]\na = "default/accuracy"\nb = "random/accuracy"\nalpha = 0.1\n'))


def test_bad_test_side_and_missing_keys(tmp_path):
    with pytest.raises(ConfigError, match="must be 'condition/metric'"):
        load_config(_write(tmp_path, BASE + '[[tests]]\na = "flipped/accuracy"\nb = "random/accuracy"\n'))
    with pytest.raises(ConfigError, match="missing required key 'tests'"):
        load_config(_write(tmp_path, BASE))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_cli_reports_config_errors(tmp_path, capsys):
    assert main(["run", str(_write(tmp_path, "oops = 1\n" + BASE))]) == 2
    assert "unknown key(s) ['oops']" in capsys.readouterr().err
