"""Experiment configs for the seed paper's null hypotheses, and their paired tests.

A config names a task, a model, label conditions, and paired tests between
(condition, metric) pairs; ``run_tests`` runs each test at its k values (Holm-corrected)
on per-context behaviour scores. Reading the TOML file, running and writing the verdict
is ``runs.experiments``. See ``experiments/*.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import pandas as pd

from mechicl.analysis.behavior import BehaviorConfig
from mechicl.analysis.stats import compare_over_k
from mechicl.data.conditions import LabelCondition
from mechicl.errors import ConfigError
from mechicl.models.registry import DEFAULT_MODEL


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


def parse_config(raw: dict[str, Any], where: str, **overrides: object) -> ExperimentConfig:
    """Validate a config table (as read from TOML); ``overrides`` replace top-level keys. ``where`` names it in errors."""
    top = {f.name for f in fields(ExperimentConfig)}
    _check_keys(raw, top, where)
    raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    for key in ("name", "hypothesis", "statement", "conditions", "tests"):
        if key not in raw:
            raise ConfigError(f"{where}: missing required key {key!r}")
    conds = []
    for i, c in enumerate(raw["conditions"]):
        _check_keys(c, _COND_KEYS, f"{where} [[conditions]] #{i + 1}")
        if "labels" not in c:
            raise ConfigError(f"{where} [[conditions]] #{i + 1}: missing 'labels' (e.g. labels = \"flipped\")")
        base = LabelCondition.parse(c["labels"])
        conds.append(LabelCondition(base.kind, base.verbalizers, base.then, base.switch_at, c.get("prefix"), c.get("name")))
    test_keys = {f.name for f in fields(PairedTestSpec)}
    tests = []
    for i, t in enumerate(raw["tests"]):
        _check_keys(t, test_keys, f"{where} [[tests]] #{i + 1}")
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
                raise ConfigError(f"{where}: test side {side!r} must be 'condition/metric' with condition in {sorted(names)}")
    return ExperimentConfig(**raw)


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


