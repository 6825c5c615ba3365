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

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.analysis.readout import label_logits, label_sequence_logprobs
from mechicl.analysis.stats import t_half_width
from mechicl.data.conditions import LabelCondition
from mechicl.data.prompts import PromptBatch
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

    def __post_init__(self) -> None:
        if self.k_max < 0 or self.n_contexts < 2:
            raise ValueError(f"need k_max >= 0 and n_contexts >= 2 (got {self.k_max}, {self.n_contexts})")


@dataclass(frozen=True)
class BehaviorResult:
    """Per-context scores (``raw``: condition, context, k, metric, value) and their summary."""

    config: BehaviorConfig
    raw: pd.DataFrame = field(repr=False)
    summary: pd.DataFrame = field(repr=False)
    seconds: float = 0.0


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
    """Mean and a t-interval over contexts for every (condition, k, metric)."""
    g = raw.groupby(["condition", "k", "metric"], sort=False)["value"]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    half = t_half_width(out["std"], out["n"], level)
    out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
    out["model"], out["task"] = model, task
    return out[SUMMARY_COLUMNS]


def score_batches(model: Any, batches: Sequence[PromptBatch], batch_size: int = 8, progress: bool = True) -> pd.DataFrame:
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
