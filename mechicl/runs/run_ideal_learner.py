"""The ideal-learner yardstick of `mechicl run` (``bayes_learner = true`` in a config): fit, tables, plots.

The model's zero-shot log-odds of every example in the draws (one short forward per distinct task
row) give the learner its prior; ``analysis.behavior.ideal_learner`` fits the evidence per demonstration on the
default-label contexts and predicts the other conditions, twice: with the zero-shot prior as it is
(``own prior``) and with a fitted prior weight (``rescaled prior``). Files: ``bayes_learner.csv`` (curves,
column ``learner``), ``bayes_fit.csv`` (prior weight, evidence strength), ``bayes_log_likelihood.png``
and ``bayes_accuracy.png``.
"""

from __future__ import annotations

import pandas as pd
import torch

from mechicl.analysis.behavior.curves import BehaviorConfig, BehaviorResult
from mechicl.analysis.behavior.ideal_learner import LearnerResult, learner_curves, learner_inputs, zero_shot_log_odds
from mechicl.data.conditions import LabelCondition
from mechicl.data.prompts import build_prompt_batch
from mechicl.data.task import Task
from mechicl.errors import ConfigError
from mechicl.models.base import LoadedModel
from mechicl.runs.behavior import behavior_batches
from mechicl.runs.folder import RunFolder
from mechicl.runs.markdown import md_table
from mechicl.viz.ideal_learner import learner_plots


def _learnable(c: LabelCondition) -> bool:
    """Conditions the learner can read: the task's own label words, no instruction prefix."""
    return c.kind in ("default", "flipped", "random") and c.prefix is None


def fit_learner(
    loaded: LoadedModel,
    task: Task,
    cfg: BehaviorConfig,
    beh: BehaviorResult,
    per_class: bool = False,
    progress: bool = True,
) -> tuple[LearnerResult, LearnerResult]:
    """Zero-shot prior for every drawn example, then ``learner_curves`` on the conditions it can read:
    (own prior, rescaled prior).

    Cost: one forward of a one-example prompt per distinct task row in the draws, plus the bootstrap.
    """
    if len(task.label_names) != 2:
        raise ConfigError(f"bayes_learner needs a binary task; {task.name} has {len(task.label_names)} labels")
    batches = [
        b for b in behavior_batches(loaded, task, cfg) if b.label_condition is None or _learnable(b.label_condition)
    ]
    if "default" not in {b.condition for b in batches}:
        raise ConfigError(
            "bayes_learner fits its evidence strength on a condition named 'default'; add "
            '[[conditions]] labels = "default" to the config'
        )
    items = torch.unique(batches[0].example_ids)
    single = build_prompt_batch(
        task,
        loaded.tokenizer,
        items[:, None],
        "default",
        n_ctx=loaded.n_ctx,
        prepend_bos=loaded.prepend_bos,
        seed=cfg.seed,
    )
    z = zero_shot_log_odds(loaded.model, single, progress=progress)
    raw = beh.raw[beh.raw.condition.isin({b.condition for b in batches})]
    x = learner_inputs(raw, batches, items, z)
    return tuple(learner_curves(x, per_class=per_class, seed=cfg.seed, rescaled=r) for r in (False, True))


def _name(res: LearnerResult) -> str:
    return "rescaled prior" if res.rescaled else "own prior"


def _cell(c: pd.DataFrame, cond: str, metric: str, source: str, k: int) -> str:
    r = c[(c.condition == cond) & (c.metric == metric) & (c.source == source) & (c.k == k)].iloc[0]
    sign = "+" if source == "model - bayes" else ""
    return f"{r['mean']:{sign}.3f} [{r.ci_low:{sign}.3f}, {r.ci_high:{sign}.3f}]"


def _fit_text(res: LearnerResult) -> str:
    return "; ".join(
        f"{'all queries' if r.query_class == 'all' else f'query class {r.query_class}'}: beta = {r.beta:.3f} nats per "
        f"demonstration [95% CI {r.ci_low:.3f}, {r.ci_high:.3f}]"
        + (" (at the bound 0)" if r.at_bound else "")
        + (
            f", prior weight w = {r.prior_weight:.3f} [{r.prior_weight_ci_low:.3f}, {r.prior_weight_ci_high:.3f}]"
            if res.rescaled
            else ""
        )
        for r in res.fit.itertuples()
    )


def learner_markdown(results: tuple[LearnerResult, ...], k_max: int) -> str:
    """The fits and, per condition, model vs each learner at a few k, with bootstrap CIs over contexts."""
    ks = sorted({0, min(4, k_max), min(16, k_max), min(32, k_max), k_max})
    rows = []
    for res in results:
        c = res.curves
        sources = ("bayes", "model - bayes") if res.rescaled else ("model", "bayes", "model - bayes")  # model once
        rows += [
            {
                "learner": "" if s == "model" else _name(res),
                "condition": cond,
                "metric": m,
                "source": s,
                **{f"k = {k}": _cell(c, cond, m, s, k) for k in ks},
            }
            for cond in dict.fromkeys(c.condition)
            for m in ("log_likelihood", "accuracy")
            for s in sources
        ]
    fits = "\n".join(f"- {_name(r)}: {_fit_text(r)}" for r in results)
    return (
        "\n".join(
            [
                "## The model against an ideal learner with its own prior",
                "",
                "The learner's prior log-odds for each query are the model's zero-shot log-odds z (the query alone); each "
                "demonstration adds +beta to the log-odds of the map it follows (Bayes' rule with independent evidence): "
                "eta = w z + beta (agreeing - disagreeing demonstrations so far). `own prior` keeps w = 1; `rescaled prior` "
                "also fits w, for a model that is less (w < 1) or more sure of a query inside a context than alone. Both "
                f"are fitted by maximum likelihood of the model's own default-label predictions (k = 1..{k_max}):",
                "",
                fits,
                "",
                "Every other row is a prediction. Means over contexts, 95% percentile-bootstrap CIs "
                f"({results[0].n_boot} resamples of contexts, refitted in each); `model - bayes` is the paired difference.",
                "",
                md_table(pd.DataFrame(rows)),
            ]
        )
        + "\n"
    )


def write_learner(folder: RunFolder, results: tuple[LearnerResult, ...], title: str) -> None:
    """bayes_learner.csv, bayes_fit.csv and the two plots (the model and each learner, per condition)."""
    curves = pd.concat([r.curves.assign(learner=_name(r)) for r in results], ignore_index=True)
    folder.csv("bayes_learner.csv", curves)
    folder.csv("bayes_fit.csv", pd.concat([r.fit.assign(learner=_name(r)) for r in results], ignore_index=True))
    learner_plots(curves, folder.path, title)
