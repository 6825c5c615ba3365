from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mechicl.cli import main
from mechicl.errors import ConfigError
from mechicl.runs.run import load_config

# `mechicl run` configs: the TOML files in experiments/ that state a hypothesis (findings.toml is another command's grid)
CONFIGS = sorted(
    p
    for p in (Path(__file__).resolve().parents[3] / "experiments").glob("*.toml")
    if "hypothesis" in tomllib.loads(p.read_text(encoding="utf-8"))
)


def test_all_four_questions_have_configs():
    assert {p.stem for p in CONFIGS} >= {
        "nh1_random_labels",
        "nh2_flipped_arbitrary",
        "nh2_instructions",
        "nh3_label_switch",
    }


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

    cfg = load_config(Path(__file__).resolve().parents[3] / "experiments" / "nh2_instructions.toml")
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
        load_config(
            _write(tmp_path, "n_context = 3\n" + BASE + '[[tests]]\na = "default/accuracy"\nb = "random/accuracy"\n')
        )
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


MARGIN_TEST = (
    '[[tests]]\na = "default/log_likelihood"\nb = "random/log_likelihood"\nalternative = "two-sided"\nks = [1, 2]\n'
)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-0.1"])
def test_min_effect_must_be_finite_and_positive(tmp_path, value, capsys):
    """Issue 30: min_effect = inf gave the verdict "no effect (within ±inf)"; now the config is refused before
    any model is loaded."""
    path = _write(tmp_path, BASE + MARGIN_TEST + f"min_effect = {value}\n")
    with pytest.raises(ConfigError, match=r"\[\[tests\]\] #1: min_effect = .*must be a finite number > 0"):
        load_config(path)
    assert main(["run", str(path), "--model", "no-such-model"]) == 2  # refused before the model is looked up
    assert "min_effect" in capsys.readouterr().err


def test_margin_ref_needs_a_fraction_and_excludes_min_effect(tmp_path):
    ref = 'margin_ref = "default/log_likelihood - random/log_likelihood_true"\n'
    with pytest.raises(ConfigError, match="margin_fraction in \\(0, 1\\)"):
        load_config(_write(tmp_path, BASE + MARGIN_TEST + ref))
    with pytest.raises(ConfigError, match="not both"):
        load_config(_write(tmp_path, BASE + MARGIN_TEST + ref + "margin_fraction = 0.15\nmin_effect = 0.1\n"))
    with pytest.raises(ConfigError, match="needs margin_ref"):
        load_config(_write(tmp_path, BASE + MARGIN_TEST + "margin_fraction = 0.15\n"))
    with pytest.raises(ConfigError, match="no metric 'nope'"):
        load_config(
            _write(
                tmp_path, BASE + MARGIN_TEST + 'margin_ref = "default/nope - random/accuracy"\nmargin_fraction = 0.2\n'
            )
        )
    cfg = load_config(_write(tmp_path, BASE + MARGIN_TEST + ref + "margin_fraction = 0.15\n"))
    assert cfg.tests[0].ref_sides == ("default/log_likelihood", "random/log_likelihood_true")


def _raw(n: int, diff: float, noise: float, ref: float, seed: int = 0) -> pd.DataFrame:
    """Per-context values: default vs random LL differ by ``diff`` on average; the reference (default - random_true) by ``ref``."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in (1, 2):
        base, e = rng.normal(-0.5, 0.3, n), rng.normal(0, noise, n)
        e -= e.mean()  # the mean difference is exactly ``diff``
        vals = {
            ("default", "log_likelihood"): base,
            ("random", "log_likelihood"): base - diff + e,
            ("random", "log_likelihood_true"): base - ref + rng.normal(0, 0.1, n),
        }
        rows += [
            pd.DataFrame({"condition": c, "context": np.arange(n), "k": k, "metric": m, "value": v})
            for (c, m), v in vals.items()
        ]
    return pd.concat(rows, ignore_index=True)


@pytest.mark.parametrize("noise, want", [(0.05, "no effect"), (0.6, "not enough draws to decide")])
def test_measured_margin_decides_equivalence(tmp_path, noise, want):
    from mechicl.analysis.behavior.hypotheses import equivalence_margins, run_tests
    from mechicl.analysis.stats.equivalence import relative_margin

    ref = 'margin_ref = "default/log_likelihood - random/log_likelihood_true"\nmargin_fraction = 0.15\n'
    cfg = load_config(_write(tmp_path, BASE + MARGIN_TEST + ref))
    raw = _raw(200, 0.0, noise, ref=0.5)
    tests, margins = run_tests(cfg, raw), equivalence_margins(cfg, raw)
    for k in (1, 2):
        sub = raw[raw.k == k].pivot_table(index="context", columns=["condition", "metric"], values="value")
        m = relative_margin(sub[("default", "log_likelihood")], sub[("random", "log_likelihood_true")], 0.15, seed=k)
        got = margins.set_index("k").loc[k]
        assert got.margin == pytest.approx(np.floor(m.margin * 1000) / 1000) and 0.06 < got.margin < 0.08
        decision = tests.set_index("k").loc[k, "decision"]
        assert decision.startswith(want)
        if want == "no effect":
            assert decision == f"no effect (within ±{got.margin:g})" and got.p_tost < 0.05
    assert list(tests.columns) == [
        "test",
        "primary",
        "a",
        "b",
        "alternative",
        "k",
        "mean_diff",
        "ci_low",
        "ci_high",
        "p_value",
        "n",
        "p_holm",
        "decision",
    ]  # tests.csv keeps its documented columns


def test_a_fixed_margin_would_call_a_third_of_the_range_no_effect(tmp_path):
    """The issue's case: with a 0.3-nat range, a fixed ±0.1 margin (a third of it) calls an undetected difference
    "no effect"; a margin of 15% of the measured range does not."""
    from mechicl.analysis.behavior.hypotheses import run_tests

    fixed = load_config(_write(tmp_path, BASE + MARGIN_TEST + "min_effect = 0.1\n"))
    rel = load_config(
        _write(
            tmp_path,
            BASE + MARGIN_TEST + 'margin_ref = "default/log_likelihood - '
            'random/log_likelihood_true"\nmargin_fraction = 0.15\n',
        )
    )
    raw = _raw(200, 0.03, 0.25, ref=0.3, seed=2)
    assert (run_tests(fixed, raw).decision == "no effect (within ±0.1)").all()
    assert (run_tests(rel, raw).decision == "not enough draws to decide").all()


def test_verdict_lists_how_each_margin_was_measured(tmp_path):
    from mechicl.analysis.behavior.hypotheses import equivalence_margins, run_tests
    from mechicl.runs.run import verdict_markdown

    cfg = load_config(
        _write(
            tmp_path,
            BASE + MARGIN_TEST + 'margin_ref = "default/log_likelihood - '
            'random/log_likelihood_true"\nmargin_fraction = 0.15\n',
        )
    )
    raw = _raw(100, 0.0, 0.05, ref=0.5)
    text = verdict_markdown(cfg, run_tests(cfg, raw), "m", equivalence_margins(cfg, raw))
    m = equivalence_margins(cfg, raw).iloc[0]
    assert f"margin ±{m.margin:.3f} = 0.15 × reference default/log_likelihood - random/log_likelihood_true" in text
    assert f"p_TOST = {m.p_tost:.4f}" in text


def test_bayes_learner_config_writes_its_files(tmp_path, capsys):
    path = Path(__file__).resolve().parents[3] / "experiments" / "nh2_bayes_learner.toml"
    out = tmp_path / "bayes"
    assert main(["run", str(path), "--model", "tiny", "--task", "toy", "--n-contexts", "6", "--out", str(out)]) == 0
    curves, fit = pd.read_csv(out / "bayes_learner.csv"), pd.read_csv(out / "bayes_fit.csv")
    assert set(curves.source) == {"model", "bayes", "model - bayes"} and set(curves.condition) == {"default", "flipped"}
    assert curves.k.max() == 64 and list(fit.learner) == ["own prior", "rescaled prior"] and (fit.beta >= 0).all()
    assert fit.prior_weight.iloc[0] == 1.0
    raw = pd.read_csv(out / "raw.csv")
    model = curves[
        (curves.source == "model")
        & (curves.metric == "log_likelihood")
        & (curves.condition == "flipped")
        & (curves.learner == "own prior")
    ]
    want = raw[(raw.condition == "flipped") & (raw.metric == "log_likelihood")].groupby("k").value.mean()
    assert np.allclose(model.set_index("k")["mean"].sort_index(), want.sort_index())
    assert "ideal learner with its own prior" in (out / "verdict.md").read_text()
    for name in ("bayes_log_likelihood.png", "bayes_accuracy.png"):
        assert (out / name).stat().st_size > 0


def test_primary_tests_share_one_holm_family(tmp_path):
    from mechicl.analysis.behavior.hypotheses import run_tests
    from mechicl.analysis.stats import holm

    two = (
        MARGIN_TEST
        + "min_effect = 0.1\n"
        + (
            '[[tests]]\na = "default/log_likelihood"\nb = "random/log_likelihood_true"\n'
            'ks = [1, 2]\n[[tests]]\na = "default/accuracy"\nb = "random/accuracy"\n'
            "ks = [1, 2]\nprimary = false\n"
        )
    )
    raw = _raw(50, 0.05, 0.3, ref=0.2, seed=4)
    raw = pd.concat([raw, raw[raw.metric == "log_likelihood"].assign(metric="accuracy")], ignore_index=True)
    out = run_tests(load_config(_write(tmp_path, BASE + two)), raw)
    prim = out[out.primary]
    assert len(prim) == 4 and np.allclose(prim.p_holm, holm(prim.p_value.to_numpy()))
    sup = out[~out.primary]
    assert np.allclose(sup.p_holm, holm(sup.p_value.to_numpy()))  # a supporting test: over its own k only
