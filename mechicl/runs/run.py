"""`mechicl run <config.toml>`: an NH experiment from its TOML config to a verdict and a run folder."""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mechicl.analysis.behavior.curves import BehaviorResult
from mechicl.analysis.behavior.hypotheses import ExperimentConfig, equivalence_margins, parse_config, run_tests
from mechicl.analysis.behavior.ideal_learner import LearnerResult
from mechicl.analysis.stats import NOT_ENOUGH
from mechicl.data.task import Task
from mechicl.data.tasks import load_task
from mechicl.errors import ConfigError
from mechicl.models.base import LoadedModel
from mechicl.runs.behavior import run_behavior, summary_markdown
from mechicl.runs.command import in_folder
from mechicl.runs.folder import RunFolder
from mechicl.runs.markdown import md_table
from mechicl.runs.run_ideal_learner import fit_learner, learner_markdown, write_learner
from mechicl.viz.behavior import plot_metric


def read_config_text(path: Path | str) -> str:
    """The TOML experiment config's text (``ConfigError`` if it is missing or not UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment config {path} does not exist (see experiments/*.toml)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text; save the TOML config as UTF-8") from e


def load_config(path: Path | str, text: str | None = None, **overrides: object) -> ExperimentConfig:
    """Read and validate a TOML experiment config (``text``: its contents, already read); ``overrides`` replace
    top-level keys."""
    try:
        raw = tomllib.loads(read_config_text(path) if text is None else text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    return parse_config(raw, str(path), **overrides)


@dataclass(frozen=True)
class ExperimentResult:
    """The behaviour scores, the tests (one row per (test, k)), the verdict text of one experiment, and
    the ideal-learner comparison when the config asks for it (``bayes_learner = true``)."""

    config: ExperimentConfig
    behavior: BehaviorResult
    tests: pd.DataFrame = field(repr=False)
    verdict: str = ""
    learner: tuple[LearnerResult, ...] = ()


def _sig(x: float) -> str:
    return f"{x:+.3f}"


def _verdict_line(cfg: ExperimentConfig, prim: pd.DataFrame) -> str:
    """The bold verdict from the primary tests: rejected (where, largest effect), not enough data, or not rejected."""
    rejected = prim[prim.decision == "reject"]
    if not rejected.empty:
        best = rejected.loc[rejected.mean_diff.abs().idxmax()]
        where = "; ".join(
            f"{g.a.iloc[0]} vs {g.b.iloc[0]} at k = {', '.join(str(k) for k in g.k)}"
            for _, g in rejected.groupby("test", sort=True)
        )
        return (
            f"**Verdict: {cfg.hypothesis} is rejected** by {where}. Largest effect: {best.a} − {best.b} = "
            f"{_sig(best.mean_diff)} [95% CI {_sig(best.ci_low)}, {_sig(best.ci_high)}] at k = {best.k} "
            f"(Holm p = {best.p_holm:.4f}, n = {best.n})."
        )
    if (prim.decision == NOT_ENOUGH).any():
        return (
            f"**Verdict: {NOT_ENOUGH}.** No primary test rejects {cfg.hypothesis}, and some CIs are wider "
            f"than their equivalence margin: run more context draws (n_contexts)."
        )
    return (
        f"**Verdict: {cfg.hypothesis} is not rejected**; every primary difference lies within its equivalence margin."
    )


def verdict_markdown(
    cfg: ExperimentConfig, tests: pd.DataFrame, model: str, margins: pd.DataFrame | None = None
) -> str:
    """Per-hypothesis verdict: rejected or not, at which k, with effect sizes and CIs.

    ``margins`` (``equivalence_margins``): how each measured equivalence margin was sized, listed under the table.
    """
    lines = [
        f"# {cfg.hypothesis}: {cfg.statement}",
        "",
        f"Model {model}, task {cfg.task}, {cfg.n_contexts} context "
        f"draws shared by all conditions, alpha = {cfg.alpha} (Holm-corrected over every k of all primary tests "
        f"together, and over the k of each supporting test).",
        "",
        _verdict_line(cfg, tests[tests.primary]),
    ]
    rows = [
        {
            "test": f"{t.a} vs {t.b}{'' if t.primary else ' (supporting)'}",
            "claim": t.claim,
            "k": r.k,
            "difference (a − b)": _sig(r.mean_diff),
            "95% CI": f"[{_sig(r.ci_low)}, {_sig(r.ci_high)}]",
            "Holm p": f"{r.p_holm:.4f}",
            "decision": r.decision,
        }
        for i, t in enumerate(cfg.tests)
        for r in tests[tests.test == i].itertuples()
    ]
    lines += ["", md_table(pd.DataFrame(rows))]
    if margins is not None and not margins.empty:
        lines += [
            "",
            "Equivalence margins measured on these draws (the fraction times the end of the reference's 95% "
            'bootstrap CI nearest 0, rounded down; "no effect" needs the test\'s whole 95% CI inside ±margin; '
            "p_TOST is Schuirmann's two one-sided t-tests against the same margin):",
            "",
        ]
        lines += [
            f"- {cfg.tests[m.test].a} vs {cfg.tests[m.test].b}, k = {m.k}: margin ±{m.margin:.3f} = "
            f"{m.fraction:g} × reference {m.reference} = {_sig(m.ref_mean)} [{_sig(m.ref_ci_low)}, "
            f"{_sig(m.ref_ci_high)}]; p_TOST = {m.p_tost:.4f}"
            for m in margins.itertuples()
        ]
    return "\n".join(lines) + "\n"


def run_experiment(
    cfg: ExperimentConfig, loaded: LoadedModel, progress: bool = True, task: Task | None = None
) -> ExperimentResult:
    """Score the config's conditions on shared draws, run its tests and write nothing. Cost: see ``ExperimentConfig``.

    ``task``: the config's task already loaded (the CLI loads it before the model); loaded here if None.
    """
    task = task or load_task(cfg.task, seed=cfg.seed, label_names=cfg.label_names)
    beh = run_behavior(loaded, task, cfg.behavior_config(), progress=progress)
    tests = run_tests(cfg, beh.raw)
    verdict = verdict_markdown(cfg, tests, loaded.name, equivalence_margins(cfg, beh.raw))
    learner: tuple[LearnerResult, ...] = ()
    if cfg.bayes_learner:
        learner = fit_learner(loaded, task, cfg.behavior_config(), beh, cfg.bayes_per_class, progress)
        verdict += "\n" + learner_markdown(learner, cfg.k_max)
    return ExperimentResult(cfg, beh, tests, verdict, learner)


def write_experiment(result: ExperimentResult, out: Path, config_text: str | None = None) -> RunFolder:
    """raw.csv, summary.csv, tests.csv, the plots, verdict.md and the config into ``out``."""
    folder = RunFolder(out)
    cfg, s = result.config, result.behavior.summary
    folder.csv("raw.csv", result.behavior.raw)
    folder.csv("summary.csv", s)
    folder.csv("tests.csv", result.tests)
    title = f"{cfg.hypothesis} ({cfg.name}): {s.model.iloc[0]} on {cfg.task}"
    for metric in cfg.plot_metrics:
        if metric not in set(s.metric):
            raise ConfigError(f"plot_metrics: no metric {metric!r} in results; have {sorted(set(s.metric))}")
        plot_metric(s, metric, folder / f"{metric}.png", title, vline=cfg.switch_at)
    if result.learner:
        write_learner(folder, result.learner, title)
    folder.text(
        "verdict.md", result.verdict + "\n" + summary_markdown(result.behavior).replace("# Behaviour", "## Behaviour")
    )
    if config_text is not None:
        folder.text("config.toml", config_text)
    return folder


def command(args: argparse.Namespace) -> int:
    """`mechicl run <config.toml>`: an NH experiment; every flag given overrides the config's value."""
    text = read_config_text(args.config)  # read once, now: the run folder keeps the config as it ran, not as edited
    cfg = load_config(
        args.config,
        text,
        model=args.model,
        task=args.task,
        n_contexts=args.n_contexts,
        seed=args.seed,
        label_names=list(args.label_names) if args.label_names else None,
        k_max=args.k,
        batch_size=args.batch_size,
        multi_token=True if args.multi_token else None,
    )

    def run(loaded: LoadedModel, task: Task, out: Path) -> str:
        print(
            f"[mechicl] {cfg.name}: {cfg.hypothesis} on {loaded.name} / {cfg.task}, {len(cfg.conditions)} conditions",
            flush=True,
        )
        result = run_experiment(cfg, loaded, task=task)
        write_experiment(result, out, text)
        return result.verdict

    return in_folder(
        args, cfg.name, run, config=cfg, model=cfg.model, task_spec=cfg.task, seed=cfg.seed, label_names=cfg.label_names
    )
