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

from mechicl.analysis.behavior import METRICS, BehaviorConfig
from mechicl.analysis.stats import compare_over_k
from mechicl.data.conditions import LabelCondition
from mechicl.errors import ConfigError, MechiclError
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
    label_names: tuple[str, ...] | None = None  # label words for file tasks with integer labels

    def behavior_config(self) -> BehaviorConfig:
        return BehaviorConfig(self.model, self.task, self.conditions, self.k_max, self.n_contexts, self.seed,
                              self.batch_size, self.multi_token, self.label_names)


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    bad = sorted(set(table) - allowed)
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {bad}; allowed keys are {sorted(allowed)}")


_COND_KEYS = {"labels", "name", "prefix"}
_INT, _NUM, _STR, _BOOL = "an integer", "a number", "a string", "true or false"
_TOP_TYPES = {"name": _STR, "hypothesis": _STR, "statement": _STR, "task": _STR, "model": _STR, "k_max": _INT,
              "n_contexts": _INT, "seed": _INT, "batch_size": _INT, "alpha": _NUM, "switch_at": _INT,
              "multi_token": _BOOL}
_TEST_TYPES = {"a": _STR, "b": _STR, "alternative": _STR, "min_effect": _NUM, "claim": _STR, "primary": _BOOL}
_COND_TYPES = {"labels": _STR, "name": _STR, "prefix": _STR}
ALTERNATIVES = ("greater", "less", "two-sided")


def _is(v: object, want: str) -> bool:
    if want == _BOOL:
        return isinstance(v, bool)
    if isinstance(v, bool):
        return False
    return isinstance(v, {_INT: int, _NUM: (int, float), _STR: str}[want])


def _check_types(table: dict, types: dict[str, str], where: str) -> None:
    """Every key's value has its field's type (TOML ``k_max = "4"`` or ``4.5`` is an error, not a cast)."""
    for key, want in types.items():
        if key in table and not _is(table[key], want):
            v = table[key]
            hint = f" (write {key} = {v}, without quotes)" if isinstance(v, str) and v.strip().lstrip("-").replace(".", "", 1).isdigit() else ""
            raise ConfigError(f"{where}: {key} must be {want}, got {type(v).__name__} {v!r}{hint}")


def _str_list(v: object, key: str, where: str) -> tuple:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v):
        raise ConfigError(f"{where}: {key} must be a non-empty list of strings, got {v!r}")
    return tuple(x.strip() for x in v)


def produced_metrics(c: LabelCondition) -> set[str]:
    """The per-context metrics a condition's results carry (see ``behavior.score``)."""
    out = set(METRICS)
    if c.compares_to_truth:
        out |= {"accuracy_true", "log_likelihood_true"}
    if c.then is not None:
        out |= {"accuracy_initial", "log_likelihood_initial"}
    return out


def parse_config(raw: dict[str, Any], where: str, **overrides: object) -> ExperimentConfig:
    """Validate a config table (as read from TOML); ``overrides`` replace top-level keys. ``where`` names it in errors.

    Every check that does not need the model happens here (types, ranges, test sides and metrics, ks,
    plot_metrics, mid-context switches), so a bad config fails before any compute.
    """
    top = {f.name for f in fields(ExperimentConfig)}
    _check_keys(raw, top, where)
    raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    for key in ("name", "hypothesis", "statement", "conditions", "tests"):
        if key not in raw:
            raise ConfigError(f"{where}: missing required key {key!r}")
    _check_types(raw, _TOP_TYPES, where)
    conds = _parse_conditions(raw["conditions"], where)
    tests = _parse_tests(raw["tests"], where)
    raw["conditions"], raw["tests"] = tuple(conds), tuple(tests)
    for key in ("plot_metrics", "label_names"):
        if key in raw:
            raw[key] = _str_list(raw[key], key, where)
    if not 0 < raw.get("alpha", 0.05) < 1:
        raise ConfigError(f"{where}: alpha must lie in (0, 1), got {raw['alpha']}")
    cfg = ExperimentConfig(**raw)
    try:
        cfg.behavior_config()
    except MechiclError as e:
        raise ConfigError(f"{where}: {e}") from e
    _check_tests(cfg, where)
    return cfg


def _parse_conditions(items: object, where: str) -> list[LabelCondition]:
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: give at least one [[conditions]] table")
    conds = []
    for i, c in enumerate(items):
        at = f"{where} [[conditions]] #{i + 1}"
        _check_keys(c, _COND_KEYS, at)
        _check_types(c, _COND_TYPES, at)
        if "labels" not in c:
            raise ConfigError(f"{at}: missing 'labels' (e.g. labels = \"flipped\")")
        base = LabelCondition.parse(c["labels"])
        conds.append(LabelCondition(base.kind, base.verbalizers, base.then, base.switch_at, c.get("prefix"), c.get("name")))
    names = [c.name for c in conds]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: condition names must be unique, got {names}; give repeated conditions a name")
    return conds


def _parse_tests(items: object, where: str) -> list[PairedTestSpec]:
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: give at least one [[tests]] table")
    test_keys = {f.name for f in fields(PairedTestSpec)}
    tests = []
    for i, t in enumerate(items):
        at = f"{where} [[tests]] #{i + 1}"
        _check_keys(t, test_keys, at)
        _check_types(t, _TEST_TYPES, at)
        if t.get("alternative", "greater") not in ALTERNATIVES:
            raise ConfigError(f"{at}: alternative must be one of {', '.join(ALTERNATIVES)}, got {t['alternative']!r}")
        if t.get("min_effect", 0.1) <= 0:
            raise ConfigError(f"{at}: min_effect must be > 0, got {t['min_effect']}")
        if "ks" in t:
            ks = t["ks"]
            if not isinstance(ks, list) or not ks or not all(_is(k, _INT) for k in ks):
                raise ConfigError(f"{at}: ks must be a non-empty list of integers, got {ks!r}")
            t = {**t, "ks": tuple(ks)}
        for key in ("a", "b"):
            if key not in t:
                raise ConfigError(f"{at}: missing {key!r} (e.g. {key} = \"default/accuracy\")")
        tests.append(PairedTestSpec(**t))
    return tests


def _check_tests(cfg: ExperimentConfig, where: str) -> None:
    """Test sides name a condition and a metric it produces; ks and plot_metrics exist in the results."""
    produced = {c.name: produced_metrics(c) for c in cfg.conditions}
    every = set().union(*produced.values())
    for i, t in enumerate(cfg.tests):
        at = f"{where} [[tests]] #{i + 1}"
        for side in (t.a, t.b):
            cond, _, metric = side.rpartition("/")
            if cond not in produced:
                raise ConfigError(f"{at}: test side {side!r} must be 'condition/metric' with condition in {sorted(produced)}")
            if metric not in produced[cond]:
                raise ConfigError(f"{at}: condition {cond!r} has no metric {metric!r}; it has {sorted(produced[cond])}")
        bad = [k for k in t.ks or () if not 0 <= k <= cfg.k_max]
        if bad:
            raise ConfigError(f"{at}: ks {bad} outside 0..k_max = {cfg.k_max}")
    bad_plots = [m for m in cfg.plot_metrics if m not in every]
    if bad_plots:
        raise ConfigError(f"{where}: plot_metrics {bad_plots} are not in the results; use some of {sorted(every)}")


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


