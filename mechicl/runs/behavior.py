"""`mechicl demo | behavior`: score label conditions on shared context draws; CSVs, the paper's curves, a summary."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pandas as pd

from mechicl.analysis.behavior.curves import BehaviorConfig, BehaviorResult, score_batches, summarize, value_at
from mechicl.data.conditions import LabelCondition, parse_conditions
from mechicl.data.prompts import PromptBatch, build_prompt_batch, sample_contexts
from mechicl.data.task import Task, check_tokenization
from mechicl.errors import ConfigError, PromptError
from mechicl.models.base import LoadedModel
from mechicl.runs.behavior_optimal_reader import bayes_lines, bayes_reference
from mechicl.runs.command import in_folder
from mechicl.runs.folder import RunFolder
from mechicl.runs.markdown import md_table
from mechicl.viz.behavior import LABELS, plot_metric
from mechicl.viz.optimal_reader import accuracy_with_bayes


def behavior_batches(loaded: LoadedModel, task: Task, cfg: BehaviorConfig) -> list[PromptBatch]:
    """One PromptBatch per condition, all on the same ``cfg.n_contexts`` context draws (tokenization only)."""
    ids = sample_contexts(task, cfg.n_contexts, cfg.n_examples, seed=cfg.seed)
    conditions = [c if isinstance(c, LabelCondition) else LabelCondition.parse(c) for c in cfg.conditions]
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise PromptError(f"condition names must be unique, got {names}; give repeated conditions an alias")
    return [
        build_prompt_batch(
            task,
            loaded.tokenizer,
            ids,
            c,
            n_ctx=loaded.n_ctx,
            prepend_bos=loaded.prepend_bos,
            seed=cfg.seed,
            multi_token=cfg.multi_token,
        )
        for c in conditions
    ]  # all built first: tokenization errors surface before any forward


def run_behavior(loaded: LoadedModel, task: Task, cfg: BehaviorConfig, progress: bool = True) -> BehaviorResult:
    """Score every condition on the same ``cfg.n_contexts`` context draws. Cost: see ``BehaviorConfig``."""
    t0 = time.perf_counter()
    check_tokenization(task, loaded.tokenizer)
    batches = behavior_batches(loaded, task, cfg)
    raw = score_batches(loaded.model, batches, cfg.batch_size, progress)
    return BehaviorResult(
        cfg, raw, summarize(raw, loaded.name, task.name), time.perf_counter() - t0, tuple(task.class_counts())
    )


def _fmt(row: pd.Series) -> str:
    return f"{row['mean']:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]"


def summary_markdown(result: BehaviorResult) -> str:
    """Numbers at k = 0, a middle k and k_max, plus plain statements about the label effect."""
    s, cfg = result.summary, result.config
    model, task = s.model.iloc[0], s.task.iloc[0]
    conds = list(dict.fromkeys(s.condition))
    ks = sorted({0, min(4, cfg.k_max), cfg.k_max})
    rows = [
        {"condition": c, "metric": m, **{f"k = {k}": _fmt(value_at(s, c, m, k)) for k in ks}}
        for c in conds
        for m in LABELS
        if ((s.condition == c) & (s.metric == m)).any()
    ]
    lines = [
        f"# Behaviour: {model} on {task}",
        "",
        f"{cfg.n_contexts} context draws (the same draws for every condition), up to k = {cfg.k_max} "
        f"observed examples, seed {cfg.seed}. Means over contexts with 95% intervals (Wilson for accuracies, "
        f"Student-t otherwise). "
        f"Scores are against the label the prompt shows; probabilities are normalised over the label set. "
        f"Wall time {result.seconds:.0f} s.",
        "",
        md_table(pd.DataFrame(rows)),
    ]
    lines += ["", "## What the curves show", ""]
    K = cfg.k_max
    if "default" in conds:
        d0, dK = value_at(s, "default", "accuracy", 0), value_at(s, "default", "accuracy", K)
        lines.append(f"- Default labels: accuracy goes from {d0['mean']:.3f} at k = 0 to {dK['mean']:.3f} at k = {K}.")
    if "flipped" in conds and "default" in conds:
        lines += _flipped_lines(s, K, result.class_counts)
    if "random" in conds:
        rK = value_at(s, "random", "accuracy_true", K)
        lines.append(f"- Random labels: accuracy against the true label at k = {K} is {_fmt(rK)}.")
    return "\n".join(lines) + "\n"


def _flipped_lines(s: pd.DataFrame, K: int, counts: tuple[int, ...]) -> list[str]:
    """What flipped labels do by k = K: how far the flipped label's LL moves, set against a uniform guess
    (log 1/C) and chance accuracy, so that a move towards 50/50 is not read as learning the flipped map."""
    f0, fK = value_at(s, "flipped", "log_likelihood", 0), value_at(s, "flipped", "log_likelihood", K)
    dK = value_at(s, "default", "log_likelihood", K)
    fa, ft = value_at(s, "flipped", "accuracy", K), value_at(s, "flipped", "accuracy_true", K)
    n_labels = len(counts) or 2
    coin, chance = math.log(1 / n_labels), 1 / n_labels
    where = "below" if fK.ci_high < coin else "above" if fK.ci_low > coin else "not distinguishable from"
    moved = (
        f"The in-context labels move the prediction (the k = 0 and k = {K} CIs do not overlap)"
        if fK.ci_low > f0.ci_high
        else f"The k = 0 and k = {K} CIs overlap: no clear move at this sample size"
    )
    if fa.ci_low > chance:
        reading = "the model picks the flipped label more often than chance: it learns part of the flipped map."
    elif fa.ci_high < chance:
        reading = "the model still picks its prior's label more often than not."
    else:
        reading = "flipped-label accuracy is at chance, so the move is towards a 50/50 guess, not to the flipped map."
    balanced = len(set(counts)) == 1 if counts else True
    return [
        f"- Flipped labels: log-likelihood of the flipped label goes from {f0['mean']:.3f} (k = 0) to {_fmt(fK)} "
        f"(k = {K}); default labels reach {dK['mean']:.3f}, and a uniform guess over the {n_labels} labels scores "
        f"log(1/{n_labels}) = {coin:.3f}. {moved}; at k = {K} the flipped label's LL is {where} a uniform guess.",
        f"- Flipped-label accuracy at k = {K}: {_fmt(fa)} ({_chance(counts)}); against the true label {_fmt(ft)}"
        + (f": {reading}" if balanced else "."),
    ]


def _chance(counts: tuple[int, ...]) -> str:
    """The chance level of the task's classes in words (balanced or not, any number of classes)."""
    if not counts:
        return "chance level unknown: no class counts"
    c = len(counts)
    kind = "binary" if c == 2 else f"{c}-class"
    if len(set(counts)) == 1:
        return f"{1 / c:.3g} is chance for this balanced {kind} task"
    return (
        f"the classes are unbalanced ({'/'.join(map(str, counts))}): always answering the most common class "
        f"scores {max(counts) / sum(counts):.3f} against true labels"
    )


def write_behavior(result: BehaviorResult, out: Path) -> RunFolder:
    """raw.csv, summary.csv, one PNG per metric, summary.md and config.json into ``out``."""
    folder = RunFolder(out)
    s = result.summary
    title = f"{s.model.iloc[0]} on {s.task.iloc[0]} ({result.config.n_contexts} contexts)"
    folder.csv("raw.csv", result.raw)
    folder.csv("summary.csv", s)
    bayes = bayes_reference(result)  # an organism on its own task: the exact Bayes-optimal reader beside it
    for metric in dict.fromkeys(s.metric):
        if metric == "accuracy" and bayes is not None:
            accuracy_with_bayes(bayes, folder / "accuracy.png", title + ": dashed = Bayes-optimal reader")
        else:
            plot_metric(s, metric, folder / f"{metric}.png", title)
    text = summary_markdown(result)
    if bayes is not None:
        folder.csv("bayes.csv", bayes)
        text += "\n".join(bayes_lines(bayes)) + "\n"
    folder.text("summary.md", text)
    folder.json("config.json", result.config)
    return folder


def command(args: argparse.Namespace) -> int:
    """`mechicl behavior | demo`: accuracy, log-likelihood and entropy against k per label condition."""
    conditions = tuple(c.name for c in parse_conditions(args.conditions))  # validate before loading
    if not conditions:
        raise ConfigError("--conditions is empty; give a comma list such as default,random,flipped")
    cfg = BehaviorConfig(
        args.model,
        args.task,
        conditions,
        args.k,
        args.n_contexts,
        args.seed,
        args.batch_size,
        args.multi_token,
        args.label_names,
    )

    def run(loaded: LoadedModel, task: Task, out: Path) -> str:
        print(f"[mechicl] task {task.name}: {task.description}", flush=True)
        return (write_behavior(run_behavior(loaded, task, cfg), out).path / "summary.md").read_text()

    return in_folder(args, "behavior", run)
