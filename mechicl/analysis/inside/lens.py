"""Logit lens at readout slots: the model's own final norm and unembedding applied to the residual
stream after each block (``readout.unembed_labels``), restricted to the label set, under default
and flipped contexts; the *critical layer* where the two part (Halawi et al.)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechicl.analysis.engine.hooks import to_host
from mechicl.analysis.engine.readout import ReadoutRun, readout_activations, unembed_labels
from mechicl.analysis.stats import t_interval
from mechicl.data.prompts import PromptBatch


def lens_names(model: Any) -> list[str]:
    """The hooks the lens reads: the residual stream after each block (and the embeddings)."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]


def lens_logits(
    model: Any, batch: PromptBatch, batch_size: int = 8, progress: bool = True, run: ReadoutRun | None = None
) -> Float[Tensor, "batch example depth n_labels"]:
    """Label logits read from the residual stream after ``depth`` blocks (0 = embeddings, n_layers = final).

    Uses the model's final norm and unembedding; depth n_layers equals the model's own logits.
    Cost: one forward per context (none with ``run``, a ``ReadoutRun`` that kept ``lens_names``) plus
    (n_layers + 1) tiny label-set readouts.
    """
    names = lens_names(model)
    out = []
    for sub, acts in readout_activations(model, batch, names, batch_size, progress, desc="lens", run=run):
        last = acts[names[-1]].device  # a split model's layers sit on several devices
        resid = torch.stack([acts[n].to(last) for n in names], dim=2)  # [b, ex, depth, d_model]
        with torch.no_grad():
            out.append(to_host(unembed_labels(model, resid, sub.label_token_ids)))
    return torch.cat(out)


@dataclass(frozen=True)
class Lens:
    """``raw``: condition, context, k, depth, metric, value. ``summary``: condition, depth, metric, mean,
    ci_low, ci_high, n (over contexts, each averaged over k >= k_min). ``gap``: depth, metric, mean, ci_low,
    ci_high of (default - flipped), paired over contexts. ``critical_depth``: first depth where the
    true-label accuracy under flipped contexts falls below default's (CI excludes 0 and gap >= min_gap);
    None when it never does. Depth d = residual after d blocks (0 = embeddings)."""

    raw: pd.DataFrame = field(repr=False)
    summary: pd.DataFrame = field(repr=False)
    gap: pd.DataFrame = field(repr=False)
    critical_depth: int | None
    min_gap: float


def lens_metrics(logits: Float[Tensor, "batch example depth n_labels"], batch: PromptBatch) -> pd.DataFrame:
    """accuracy / log_likelihood against shown and true labels over the label set, per (context, k, depth)."""
    logp = torch.log_softmax(logits.double(), -1)
    n, k, d, _ = logp.shape
    frames = []
    for name, target in [("shown", batch.shown_labels), ("true", batch.true_labels)]:
        t = target[:, :, None].expand(n, k, d)
        for metric, v in [
            (f"accuracy_{name}", (logp.argmax(-1) == t).double()),
            (f"log_likelihood_{name}", logp.gather(-1, t[..., None])[..., 0]),
        ]:
            frames.append(
                pd.DataFrame(
                    {
                        "condition": batch.condition,
                        "context": np.repeat(np.arange(n), k * d),
                        "k": np.tile(np.repeat(np.arange(k), d), n),
                        "depth": np.tile(np.arange(d), n * k),
                        "metric": metric,
                        "value": v.reshape(-1).numpy(),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def logit_lens(
    model: Any,
    batches: Sequence[PromptBatch],
    k_min: int = 1,
    min_gap: float = 0.05,
    batch_size: int = 8,
    progress: bool = True,
    runs: Sequence[ReadoutRun] | None = None,
) -> Lens:
    """Logit lens for each batch (give ``default`` and ``flipped`` built from the same example ids).

    Cost: one forward per context per batch (none with ``runs``: one ``ReadoutRun`` per batch).
    """
    runs = runs if runs is not None else [None] * len(batches)
    raw = pd.concat(
        [lens_metrics(lens_logits(model, b, batch_size, progress, r), b) for b, r in zip(batches, runs)],
        ignore_index=True,
    )
    per_ctx = raw[raw.k >= k_min].groupby(["condition", "depth", "metric", "context"], sort=False)["value"].mean()
    rows = []
    for (cond, depth, metric), s in per_ctx.groupby(level=[0, 1, 2], sort=False):
        m, lo, hi = t_interval(s.to_numpy())
        rows.append((cond, depth, metric, m, lo, hi, len(s)))
    summary = pd.DataFrame(rows, columns=["condition", "depth", "metric", "mean", "ci_low", "ci_high", "n"])
    conds = set(raw.condition)
    gap_rows, critical = [], None
    if {"default", "flipped"} <= conds:
        pc = per_ctx.unstack("condition")
        for (depth, metric), s in pc.groupby(level=[0, 1], sort=False):
            m, lo, hi = t_interval((s["default"] - s["flipped"]).to_numpy())
            gap_rows.append((depth, metric, m, lo, hi))
    gap = pd.DataFrame(gap_rows, columns=["depth", "metric", "mean", "ci_low", "ci_high"])
    if len(gap):
        critical = critical_depth(gap, min_gap)
    return Lens(raw, summary, gap, critical, min_gap)


def critical_depth(gap: pd.DataFrame, min_gap: float = 0.05) -> int | None:
    """First depth whose true-label accuracy gap (default - flipped) is >= ``min_gap`` with its CI above 0."""
    acc = gap[gap.metric == "accuracy_true"].sort_values("depth")
    hits = acc[(acc.ci_low > 0) & (acc["mean"] >= min_gap)]
    return int(hits.depth.iloc[0]) if len(hits) else None
