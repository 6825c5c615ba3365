"""Kossen et al.'s behavioural readout: accuracy, log-likelihood and entropy against k.

Every label condition runs on the *same* context draws (same inputs, same
order), so conditions can be compared pairwise. Each context yields the whole
curve k = 0..K-1 from one teacher-forced forward (see ``readout``).

Scoring: probabilities are normalised over the label set. With single-token
labels that is a softmax over the label tokens' logits at the readout slot.
With ``multi_token=True`` and a label of several tokens, each class's whole
label sequence is scored (sum of its token log-probabilities given the context)
and the softmax runs over those sequence scores; this costs
``n_examples * n_labels`` prefix forwards per context instead of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.analysis.engine.readout import label_logits, label_sequence_logprobs
from mechicl.analysis.stats import t_half_width, wilson_interval
from mechicl.data.conditions import LabelCondition
from mechicl.data.prompts import PromptBatch
from mechicl.errors import ConfigError
from mechicl.models.registry import DEFAULT_MODEL

METRICS = ("accuracy", "log_likelihood", "entropy")
SUMMARY_COLUMNS = ["model", "task", "condition", "k", "metric", "mean", "ci_low", "ci_high", "n"]


@dataclass(frozen=True)
class BehaviorConfig:
    """One behaviour experiment.

    Cost: ``len(conditions) * n_contexts`` forwards of contexts with ``k_max + 1``
    examples (about 9 tokens per example on vader-words). Memory: one batch of
    residual streams (``batch_size x pos x d_model`` floats).
    """

    model: str = DEFAULT_MODEL
    task: str = "vader-words"
    conditions: tuple[str | LabelCondition, ...] = ("default", "random", "flipped")
    k_max: int = 16  # largest number of observed examples; contexts hold k_max + 1 examples
    n_contexts: int = 64
    seed: int = 0
    batch_size: int = 8
    multi_token: bool = False  # allow label words of several tokens (sequence scoring, costlier)

    @property
    def n_examples(self) -> int:
        """Examples per context, the last one included (``k_max + 1``): the word every other config uses."""
        return self.k_max + 1

    label_names: tuple[str, ...] | None = None  # label words for file tasks with integer labels

    def __post_init__(self) -> None:
        for name in ("k_max", "n_contexts", "seed", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"{name} must be an integer, got {type(v).__name__} {v!r}")
        if self.k_max < 0 or self.n_contexts < 2 or self.seed < 0 or self.batch_size < 1:
            raise ConfigError(
                f"need k_max >= 0, n_contexts >= 2, seed >= 0 and batch_size >= 1 (got k_max={self.k_max}, "
                f"n_contexts={self.n_contexts}, seed={self.seed}, batch_size={self.batch_size})"
            )
        if not self.conditions:
            raise ConfigError("no label conditions; give at least one, e.g. default,flipped")
        for c in self.conditions:
            (c if isinstance(c, LabelCondition) else LabelCondition.parse(c)).check_fits(self.n_examples)


@dataclass(frozen=True)
class BehaviorResult:
    """Per-context scores (``raw``: condition, context, k, metric, value) and their summary."""

    config: BehaviorConfig
    raw: pd.DataFrame = field(repr=False)
    summary: pd.DataFrame = field(repr=False)
    seconds: float = 0.0
    class_counts: tuple[int, ...] = ()  # examples per class in the task (for the chance level)


def score(logits: Float[Tensor, "batch example n_labels"], batch: PromptBatch) -> pd.DataFrame:
    """Long table of per-context metrics at each k, scored against the *shown* labels.

    Conditions whose shown labels can differ from the true ones (random, flipped,
    mid-context changes) also get ``accuracy_true`` and ``log_likelihood_true``;
    mid-context changes get ``*_initial``, scored against the map the context
    started with (``accuracy``/``log_likelihood`` follow the *current* map).
    """
    logp = torch.log_softmax(logits.double(), dim=-1)
    n, k, _ = logp.shape
    cond = batch.label_condition
    targets = {"": batch.shown_labels}
    if cond is not None and cond.compares_to_truth:
        targets["_true"] = batch.true_labels
    if cond is not None and cond.then is not None and batch.initial_labels is not None:
        targets["_initial"] = batch.initial_labels
    cols: dict[str, Tensor] = {}
    for suffix, target in targets.items():
        cols["accuracy" + suffix] = (logp.argmax(-1) == target).double()
        cols["log_likelihood" + suffix] = logp.gather(-1, target[..., None])[..., 0]
    cols["entropy"] = -(logp.exp() * logp).sum(-1)
    frames = [
        pd.DataFrame(
            {
                "condition": batch.condition,
                "context": np.repeat(np.arange(n), k),
                "k": np.tile(np.arange(k), n),
                "metric": name,
                "value": v.reshape(-1).numpy(),
            }
        )
        for name, v in cols.items()
    ]
    return pd.concat(frames, ignore_index=True)


def summarize(raw: pd.DataFrame, model: str, task: str, level: float = 0.95) -> pd.DataFrame:
    """Mean and an interval over contexts for every (condition, k, metric).

    Accuracies (``accuracy*``, one 0/1 value per context) get the Wilson score interval, inside [0, 1] by
    construction; continuous metrics (log-likelihood, entropy) get a Student-t interval.
    """
    g = raw.groupby(["condition", "k", "metric"], sort=False)["value"]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    half = t_half_width(out["std"], out["n"], level)
    out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
    prop = out["metric"].str.startswith("accuracy")
    lo, hi = wilson_interval(out.loc[prop, "mean"] * out.loc[prop, "n"], out.loc[prop, "n"], level)
    out.loc[prop, "ci_low"], out.loc[prop, "ci_high"] = lo, hi
    out["model"], out["task"] = model, task
    return out[SUMMARY_COLUMNS]


def score_batches(
    model: Any, batches: Sequence[PromptBatch], batch_size: int = 8, progress: bool = True
) -> pd.DataFrame:
    """Per-context scores of every batch (one per condition, the same context draws), stacked.

    Cost: one forward per context (single-token labels) or ``n_examples * n_labels`` prefix forwards
    per context (multi-token labels, sequence scoring normalised over the label set by ``score``).
    """
    raws = []
    for batch in tqdm(batches, desc="conditions", unit="cond", disable=not progress):
        if batch.label_token_seqs is None:
            logits = label_logits(model, batch, batch_size, progress)
        else:
            logits = label_sequence_logprobs(model, batch, progress=progress)
        raws.append(score(logits, batch))
    return pd.concat(raws, ignore_index=True)


def value_at(summary: pd.DataFrame, condition: str, metric: str, k: int) -> pd.Series:
    """The summary row for one (condition, metric, k)."""
    row = summary[(summary.condition == condition) & (summary.metric == metric) & (summary.k == k)]
    if row.empty:
        raise KeyError(f"no summary row for condition={condition} metric={metric} k={k}")
    return row.iloc[0]
