"""Experiment configs for the seed paper's null hypotheses, and their paired tests.

A config names a task, a model, label conditions, and paired tests between
(condition, metric) pairs; ``run_tests`` runs each test at its k values (Holm-corrected)
on per-context behaviour scores. Reading the TOML file, running and writing the verdict
is ``runs.run``. See ``experiments/*.toml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import pandas as pd

from mechicl.analysis.behavior.curves import METRICS, BehaviorConfig
from mechicl.analysis.stats import (
    NOT_ENOUGH,
    PairedResult,
    check_margin,
    compare_over_k,
    decide,
    holm,
    relative_margin,
    tost,
)
from mechicl.data.conditions import LabelCondition
from mechicl.errors import ConfigError, MechiclError
from mechicl.models.registry import DEFAULT_MODEL


@dataclass(frozen=True)
class PairedTestSpec:
    """``a`` vs ``b``, each 'condition/metric'; ``ks`` None means k = 1..k_max.

    The equivalence margin is ``min_effect``, or, with ``margin_ref = "c1/m1 - c2/m2"``, ``margin_fraction``
    of that reference difference measured at the same k on the same draws (``equivalence.relative_margin``).
    """

    a: str
    b: str
    alternative: str = "greater"
    min_effect: float = 0.1
    ks: tuple[int, ...] | None = None
    claim: str = ""
    primary: bool = True
    margin_ref: str | None = None
    margin_fraction: float | None = None

    @property
    def ref_sides(self) -> tuple[str, str] | None:
        """The two 'condition/metric' sides of ``margin_ref`` (None without one)."""
        if self.margin_ref is None:
            return None
        a, sep, b = self.margin_ref.partition(" - ")
        return (a.strip(), b.strip()) if sep else None


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
    bayes_learner: bool = False  # fit the ideal learner with the model's own prior (analysis.behavior.ideal_learner)
    bayes_per_class: bool = False  # one evidence strength per query class instead of one scalar

    def behavior_config(self) -> BehaviorConfig:
        return BehaviorConfig(
            self.model,
            self.task,
            self.conditions,
            self.k_max,
            self.n_contexts,
            self.seed,
            self.batch_size,
            self.multi_token,
            self.label_names,
        )


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    bad = sorted(set(table) - allowed)
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {bad}; allowed keys are {sorted(allowed)}")


_COND_KEYS = {"labels", "name", "prefix"}
_INT, _NUM, _STR, _BOOL = "an integer", "a number", "a string", "true or false"
_TOP_TYPES = {
    "name": _STR,
    "hypothesis": _STR,
    "statement": _STR,
    "task": _STR,
    "model": _STR,
    "k_max": _INT,
    "n_contexts": _INT,
    "seed": _INT,
    "batch_size": _INT,
    "alpha": _NUM,
    "switch_at": _INT,
    "multi_token": _BOOL,
    "bayes_learner": _BOOL,
    "bayes_per_class": _BOOL,
}
_TEST_TYPES = {
    "a": _STR,
    "b": _STR,
    "alternative": _STR,
    "min_effect": _NUM,
    "claim": _STR,
    "primary": _BOOL,
    "margin_ref": _STR,
    "margin_fraction": _NUM,
}
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
            hint = (
                f" (write {key} = {v}, without quotes)"
                if isinstance(v, str) and v.strip().lstrip("-").replace(".", "", 1).isdigit()
                else ""
            )
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
        conds.append(
            LabelCondition(base.kind, base.verbalizers, base.then, base.switch_at, c.get("prefix"), c.get("name"))
        )
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
        if "min_effect" in t:
            try:
                check_margin(t["min_effect"], "min_effect")
            except ConfigError as e:
                raise ConfigError(f"{at}: {e}") from None
        _check_margin(t, at)
        if "ks" in t:
            ks = t["ks"]
            if not isinstance(ks, list) or not ks or not all(_is(k, _INT) for k in ks):
                raise ConfigError(f"{at}: ks must be a non-empty list of integers, got {ks!r}")
            t = {**t, "ks": tuple(ks)}
        for key in ("a", "b"):
            if key not in t:
                raise ConfigError(f'{at}: missing {key!r} (e.g. {key} = "default/accuracy")')
        tests.append(PairedTestSpec(**t))
    return tests


def _check_margin(t: dict, at: str) -> None:
    """``margin_ref`` ('c1/m1 - c2/m2') comes with a ``margin_fraction`` in (0, 1) and replaces ``min_effect``."""
    if "margin_ref" not in t:
        if "margin_fraction" in t:
            raise ConfigError(f'{at}: margin_fraction needs margin_ref = "cond/metric - cond/metric"')
        return
    if "min_effect" in t:
        raise ConfigError(f"{at}: give min_effect or margin_ref, not both")
    if " - " not in t["margin_ref"]:
        raise ConfigError(f"{at}: margin_ref must read 'cond/metric - cond/metric', got {t['margin_ref']!r}")
    if not 0 < t.get("margin_fraction", -1) < 1:
        raise ConfigError(
            f"{at}: margin_ref needs margin_fraction in (0, 1) (e.g. 0.15), got {t.get('margin_fraction')!r}"
        )


def _check_tests(cfg: ExperimentConfig, where: str) -> None:
    """Test sides name a condition and a metric it produces; ks and plot_metrics exist in the results."""
    produced = {c.name: produced_metrics(c) for c in cfg.conditions}
    every = set().union(*produced.values())
    for i, t in enumerate(cfg.tests):
        at = f"{where} [[tests]] #{i + 1}"
        for side in (t.a, t.b, *(t.ref_sides or ())):
            cond, _, metric = side.rpartition("/")
            if cond not in produced:
                raise ConfigError(
                    f"{at}: test side {side!r} must be 'condition/metric' with condition in {sorted(produced)}"
                )
            if metric not in produced[cond]:
                raise ConfigError(f"{at}: condition {cond!r} has no metric {metric!r}; it has {sorted(produced[cond])}")
        bad = [k for k in t.ks or () if not 0 <= k <= cfg.k_max]
        if bad:
            raise ConfigError(f"{at}: ks {bad} outside 0..k_max = {cfg.k_max}")
    bad_plots = [m for m in cfg.plot_metrics if m not in every]
    if bad_plots:
        raise ConfigError(f"{where}: plot_metrics {bad_plots} are not in the results; use some of {sorted(every)}")


def _ks(cfg: ExperimentConfig, t: PairedTestSpec) -> list[int]:
    ks = list(t.ks) if t.ks is not None else list(range(1, cfg.k_max + 1))
    bad = [k for k in ks if not 0 <= k <= cfg.k_max]
    if bad:
        raise ConfigError(f"test {t.a} vs {t.b}: k values {bad} outside 0..{cfg.k_max}")
    return ks


def _per_context(raw: pd.DataFrame, side: str, k: int):
    cond, metric = side.rsplit("/", 1)
    v = raw[(raw.condition == cond) & (raw.metric == metric) & (raw.k == k)].sort_values("context")
    if v.empty:
        raise KeyError(f"no results for {side} at k = {k}")
    return v.value.to_numpy()


def equivalence_margins(cfg: ExperimentConfig, raw: pd.DataFrame) -> pd.DataFrame:
    """For each test with ``margin_ref``: per k, the reference difference, the margin and the TOST p-value.

    Columns: test, k, reference, fraction, ref_mean, ref_ci_low, ref_ci_high, margin, p_tost. The margin is
    rounded *down* to 3 decimals (never wider than computed). Cost: one paired bootstrap per (test, k).
    """
    rows = []
    for i, t in enumerate(cfg.tests):
        if t.ref_sides is None:
            continue
        for k in _ks(cfg, t):
            m = relative_margin(
                *(_per_context(raw, side, k) for side in t.ref_sides), t.margin_fraction, seed=cfg.seed + k
            )
            margin = math.floor(m.margin * 1000) / 1000 if math.isfinite(m.margin) else math.nan
            d = _per_context(raw, t.a, k) - _per_context(raw, t.b, k)
            rows.append(
                {
                    "test": i,
                    "k": k,
                    "reference": t.margin_ref,
                    "fraction": t.margin_fraction,
                    "ref_mean": m.ref_mean,
                    "ref_ci_low": m.ref_ci_low,
                    "ref_ci_high": m.ref_ci_high,
                    "margin": margin,
                    "p_tost": tost(d, margin)[2] if margin > 0 else math.nan,
                }
            )
    return pd.DataFrame(
        rows,
        columns=["test", "k", "reference", "fraction", "ref_mean", "ref_ci_low", "ref_ci_high", "margin", "p_tost"],
    )


def run_tests(cfg: ExperimentConfig, raw: pd.DataFrame) -> pd.DataFrame:
    """One row per (test, k): paired difference, bootstrap CI, permutation p, Holm p and the decision.

    Holm runs over every (test, k) row of the *primary* tests together (they decide one hypothesis, so
    several primary tests share one family) and over the k of each supporting test. Tests with
    ``margin_ref`` decide "no effect" against their measured margin (``equivalence_margins``); a margin
    that cannot be sized (reference CI holds 0) leaves only "reject" or "not enough draws".
    """
    margins = equivalence_margins(cfg, raw).set_index(["test", "k"])
    frames = []
    for i, t in enumerate(cfg.tests):
        a, b = tuple(t.a.rsplit("/", 1)), tuple(t.b.rsplit("/", 1))
        df = compare_over_k(
            raw, a, b, _ks(cfg, t), alternative=t.alternative, alpha=cfg.alpha, min_effect=t.min_effect, seed=cfg.seed
        )
        df.insert(0, "test", i)
        df.insert(1, "primary", t.primary)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    prim = out.primary.to_numpy(dtype=bool)
    out.loc[prim, "p_holm"] = holm(out.p_value[prim].to_numpy())
    out["decision"] = [
        _decide(
            r,
            margins.loc[(r.test, r.k), "margin"] if cfg.tests[r.test].ref_sides else cfg.tests[r.test].min_effect,
            cfg.alpha,
            cfg.tests[r.test].alternative,
        )
        for r in out.itertuples()
    ]
    return out


def _decide(r: Any, margin: float, alpha: float, alternative: str) -> str:
    if not margin > 0:
        return "reject" if r.p_holm < alpha else NOT_ENOUGH
    return decide(PairedResult(r.mean_diff, r.ci_low, r.ci_high, r.p_value, r.n), r.p_holm, alpha, margin, alternative)
