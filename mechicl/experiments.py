"""Experiment configs (TOML, no code) for the seed paper's null hypotheses, and their verdicts.

A config names a task, a model, label conditions, and paired tests between
(condition, metric) pairs. ``run_experiment`` scores every condition on the same
context draws, runs each test at its k values (Holm-corrected), and writes tidy
CSVs, the paper's plots and a markdown verdict. See ``experiments/*.toml``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

import pandas as pd

from mechicl.behavior import BehaviorConfig, BehaviorResult, run_behavior
from mechicl.models import DEFAULT_MODEL, LoadedModel
from mechicl.prompts import LabelCondition
from mechicl.stats import NOT_ENOUGH, compare_over_k
from mechicl.tasks import load_task


class ConfigError(ValueError):
    """A malformed experiment config."""


@dataclass(frozen=True)
class PairedTestSpec:
    """``a`` vs ``b``, each 'condition/metric'; ``ks`` None means k = 1..k_max."""

    a: str
    b: str
    alternative: str = "greater"
    min_effect: float = 0.1
    ks: tuple[int, ...] | None = None
    claim: str = ""
    primary: bool = True


@dataclass(frozen=True)
class ExperimentConfig:
    """A hypothesis test. Cost: ``len(conditions) * n_contexts`` forwards (see BehaviorConfig)."""

    name: str
    hypothesis: str
    statement: str
    conditions: tuple[LabelCondition, ...]
    tests: tuple[PairedTestSpec, ...]
    task: str = "vader-words"
    model: str = DEFAULT_MODEL
    k_max: int = 16
    n_contexts: int = 64
    seed: int = 0
    batch_size: int = 8
    alpha: float = 0.05
    plot_metrics: tuple[str, ...] = ("accuracy", "log_likelihood", "entropy")
    switch_at: int | None = None  # drawn as a vertical line on the plots
    multi_token: bool = False  # allow multi-token label words (sequence scoring)

    def behavior_config(self) -> BehaviorConfig:
        return BehaviorConfig(
            self.model, self.task, self.conditions, self.k_max, self.n_contexts, self.seed, self.batch_size, self.multi_token
        )


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    bad = sorted(set(table) - allowed)
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {bad}; allowed keys are {sorted(allowed)}")


_COND_KEYS = {"labels", "name", "prefix"}


def load_config(path: Path | str, **overrides: object) -> ExperimentConfig:
    """Parse and validate a TOML experiment config; ``overrides`` replace top-level keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment config {path} does not exist (see experiments/*.toml)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    top = {f.name for f in fields(ExperimentConfig)}
    _check_keys(raw, top, str(path))
    raw.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("name", "hypothesis", "statement", "conditions", "tests"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required key {key!r}")
    conds = []
    for i, c in enumerate(raw["conditions"]):
        _check_keys(c, _COND_KEYS, f"{path} [[conditions]] #{i + 1}")
        if "labels" not in c:
            raise ConfigError(f"{path} [[conditions]] #{i + 1}: missing 'labels' (e.g. labels = \"flipped\")")
        base = LabelCondition.parse(c["labels"])
        conds.append(LabelCondition(base.kind, base.verbalizers, base.then, base.switch_at, c.get("prefix"), c.get("name")))
    test_keys = {f.name for f in fields(PairedTestSpec)}
    tests = []
    for i, t in enumerate(raw["tests"]):
        _check_keys(t, test_keys, f"{path} [[tests]] #{i + 1}")
        if "ks" in t:
            t = {**t, "ks": tuple(t["ks"])}
        tests.append(PairedTestSpec(**t))
    raw["conditions"], raw["tests"] = tuple(conds), tuple(tests)
    if "plot_metrics" in raw:
        raw["plot_metrics"] = tuple(raw["plot_metrics"])
    names = {c.name for c in conds}
    for t in tests:
        for side in (t.a, t.b):
            cond = side.rsplit("/", 1)[0]
            if "/" not in side or cond not in names:
                raise ConfigError(f"{path}: test side {side!r} must be 'condition/metric' with condition in {sorted(names)}")
    return ExperimentConfig(**raw)


@dataclass(frozen=True)
class ExperimentResult:
    config: ExperimentConfig
    behavior: BehaviorResult
    tests: pd.DataFrame = field(repr=False)  # one row per (test, k)
    verdict: str = ""


def run_tests(cfg: ExperimentConfig, raw: pd.DataFrame) -> pd.DataFrame:
    frames = []
    for i, t in enumerate(cfg.tests):
        ks = list(t.ks) if t.ks is not None else list(range(1, cfg.k_max + 1))
        bad = [k for k in ks if not 0 <= k <= cfg.k_max]
        if bad:
            raise ConfigError(f"test {t.a} vs {t.b}: k values {bad} outside 0..{cfg.k_max}")
        a, b = tuple(t.a.rsplit("/", 1)), tuple(t.b.rsplit("/", 1))
        df = compare_over_k(raw, a, b, ks, alternative=t.alternative, alpha=cfg.alpha, min_effect=t.min_effect, seed=cfg.seed)
        df.insert(0, "test", i)
        df.insert(1, "primary", t.primary)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _sig(x: float) -> str:
    return f"{x:+.3f}"


def verdict_markdown(cfg: ExperimentConfig, tests: pd.DataFrame, model: str) -> str:
    """Per-hypothesis verdict: rejected or not, at which k, with effect sizes and CIs."""
    prim = tests[tests.primary]
    rejected = prim[prim.decision == "reject"]
    lines = [f"# {cfg.hypothesis}: {cfg.statement}", "", f"Model {model}, task {cfg.task}, {cfg.n_contexts} context "
             f"draws shared by all conditions, alpha = {cfg.alpha} (Holm-corrected over the k of each test).", ""]
    if not rejected.empty:
        best = rejected.loc[rejected.mean_diff.abs().idxmax()]
        ks = ", ".join(str(k) for k in rejected.k)
        lines.append(
            f"**Verdict: {cfg.hypothesis} is rejected** at k = {ks}. Largest effect: {best.a} − {best.b} = "
            f"{_sig(best.mean_diff)} [95% CI {_sig(best.ci_low)}, {_sig(best.ci_high)}] at k = {best.k} "
            f"(Holm p = {best.p_holm:.4f}, n = {best.n})."
        )
    elif (prim.decision == NOT_ENOUGH).any():
        lines.append(f"**Verdict: {NOT_ENOUGH}.** No primary test rejects {cfg.hypothesis}, and some CIs are wider "
                     f"than their equivalence margin: run more context draws (n_contexts).")
    else:
        lines.append(f"**Verdict: {cfg.hypothesis} is not rejected**; every primary difference lies within its "
                     f"equivalence margin.")
    lines += ["", "| test | claim | k | difference (a − b) | 95% CI | Holm p | decision |", "|---|---|---|---|---|---|---|"]
    for i, t in enumerate(cfg.tests):
        for _, r in tests[tests.test == i].iterrows():  # small table: one row per tested k
            lines.append(
                f"| {t.a} vs {t.b}{'' if t.primary else ' (supporting)'} | {t.claim} | {r.k} | {_sig(r.mean_diff)} | "
                f"[{_sig(r.ci_low)}, {_sig(r.ci_high)}] | {r.p_holm:.4f} | {r.decision} |"
            )
    return "\n".join(lines) + "\n"


def run_experiment(cfg: ExperimentConfig, loaded: LoadedModel, progress: bool = True) -> ExperimentResult:
    task = load_task(cfg.task, seed=cfg.seed)
    beh = run_behavior(loaded, task, cfg.behavior_config(), progress=progress)
    tests = run_tests(cfg, beh.raw)
    return ExperimentResult(cfg, beh, tests, verdict_markdown(cfg, tests, loaded.name))


def write_experiment(result: ExperimentResult, out: Path, config_text: str | None = None) -> dict[str, Path]:
    from mechicl.report import plot_metric, summary_markdown

    out.mkdir(parents=True, exist_ok=True)
    cfg, s = result.config, result.behavior.summary
    files = {"raw": out / "raw.csv", "summary": out / "summary.csv", "tests": out / "tests.csv", "verdict": out / "verdict.md"}
    result.behavior.raw.to_csv(files["raw"], index=False)
    s.to_csv(files["summary"], index=False)
    result.tests.to_csv(files["tests"], index=False)
    title = f"{cfg.hypothesis} ({cfg.name}): {s.model.iloc[0]} on {cfg.task}"
    for metric in cfg.plot_metrics:
        if metric not in set(s.metric):
            raise ConfigError(f"plot_metrics: no metric {metric!r} in results; have {sorted(set(s.metric))}")
        files[f"plot_{metric}"] = plot_metric(s, metric, out / f"{metric}.png", title, vline=cfg.switch_at)
    files["verdict"].write_text(result.verdict + "\n" + summary_markdown(result.behavior).replace("# Behaviour", "## Behaviour"))
    if config_text is not None:
        (out / "config.toml").write_text(config_text)
    return files
