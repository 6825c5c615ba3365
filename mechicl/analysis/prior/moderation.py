"""How in-context labels compete with the pre-trained prior, per query (issue 28, item 1).

**Prior strength** of a query: the model's own zero-shot log-odds for its true class,
``log P(true) - log max_{other} P(other)`` over the label words at k = 0 (``prior_strength``). Positive: the model
already answers correctly without context; large: it is confident.

**Moderation** (``moderation``): every readout slot ``s`` of every context is a query with its own prior strength.
Slots are binned by prior strength (``bins``, edges in log-odds) and by k (the slot's number of demonstrations).
Per bin, with 95% cluster-bootstrap CIs over contexts (the slots of one context resampled together):

- behaviour: P(true) in correct- and flipped-label contexts, and ``sides_with_prior``: the share of flipped slots
  whose prediction is still the true class (the prior won over the shown labels);
- per head set: ΔP(true) when its output at the slot is interchanged between the conditions (``interchange``:
  the label information it carries), in correct (``d_correct``, negative when it helped) and flipped contexts
  (``d_flipped``, positive when it pushed towards the shown wrong label), and their difference ``closed``: the
  share of the bin's gap that the head's label signal accounts for is ``closed / gap``.

"Does the label heads' contribution shrink as the prior grows?" is then ``closed`` across prior bins at fixed k,
and "at what prior and k does the model side with the prior?" is where ``sides_with_prior`` crosses 0.5.
Cost: the zero-shot queries (one short forward each, ``ReadoutStepper``), and one interchange run of each head set
over every slot (``HeadAblation.scores``; ``2 x S`` one-token steps per context per set).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float
from torch import Tensor

from mechicl.analysis.engine.hooks import Head, fmt_heads
from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.analysis.heads.ablation import CONDITIONS, HeadAblation
from mechicl.analysis.stats import mean_ci

BINS = (-np.inf, -1.0, 0.0, 1.0, 2.0, np.inf)  # log-odds edges: against the truth, weak, moderate, strong prior


def logit_diff(logits: Float[Tensor, "... labels"], a: Tensor, b: Tensor) -> Float[np.ndarray, "..."]:
    """``logit[a] - logit[b]`` over the label words (float64), ``a`` and ``b`` class indices broadcast against
    ``logits``' leading axes: the one margin ``analysis.prior`` reads (routes, dose)."""
    lg = logits.double()
    at = lambda y: lg.gather(-1, y.expand(lg.shape[:-1])[..., None])[..., 0]  # noqa: E731
    return (at(a) - at(b)).numpy()


def log_odds(logits: Float[Tensor, "... labels"], cls: Tensor) -> Float[np.ndarray, "..."]:
    """Log-odds of class ``cls`` against the most likely other class over the label words (float64): the logit
    margin, as softmax's normaliser cancels."""
    lg = logits.double()
    c = cls.expand(lg.shape[:-1])[..., None]
    return (lg.gather(-1, c)[..., 0] - lg.scatter(-1, c, -np.inf).max(-1).values).numpy()


def prior_strength(zs: ReadoutStepper) -> Float[np.ndarray, "query"]:
    """Zero-shot log-odds of each query's true class against the most likely other class (label words only)."""
    return log_odds(zs.base_logits, zs.batch.true_labels[:, -1])  # the stepper reads the query slot only


def bin_labels(edges: Sequence[float]) -> list[str]:
    fmt = lambda x: "-inf" if x == -np.inf else ("inf" if x == np.inf else f"{x:+g}")  # noqa: E731
    return [f"[{fmt(a)}, {fmt(b)})" for a, b in zip(edges[:-1], edges[1:])]


def moderation(
    abl: HeadAblation,
    sets: Sequence[Sequence[Head]],
    prior: Float[np.ndarray, "batch slot"],
    *,
    bins: Sequence[float] = BINS,
    k_groups: Sequence[tuple[int, int]] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (head set, prior bin, k group): behaviour and the set's interchange effect with CIs.

    ``abl``: an ablation in any mode (its interchange twin is used); ``prior [b, S]``: the prior strength of each
    slot's query (``prior_strength`` of the slots' queries, reshaped); ``k_groups``: inclusive (k_lo, k_hi) ranges
    of slot k (default: each slot alone). Bins with fewer than 2 contexts are dropped (no interval)."""
    inter = abl.with_mode("interchange")
    sc = inter.scores(sets)
    b, S = abl.labels.shape
    if prior.shape != (b, S):
        raise ValueError(f"prior must be [contexts, slots] = ({b}, {S}), got {prior.shape}")
    k0 = abl.st["correct"].k_min
    ks = np.arange(k0, k0 + S)
    groups = list(k_groups) if k_groups is not None else [(int(k), int(k)) for k in ks]
    which = np.digitize(prior, np.asarray(bins)[1:-1])  # [b, S] bin index
    names = bin_labels(bins)
    base = {c: abl.base[c] for c in CONDITIONS}  # [b, S]
    pred_true_f = (abl.st["flipped"].base_logits.argmax(-1) == abl.labels).numpy()  # [b, S]
    rows = []
    for lo, hi in groups:
        in_k = (ks >= lo) & (ks <= hi)
        for j, name in enumerate(names):
            mask = (which == j) & in_k[None]
            ctx = np.flatnonzero(mask.any(1))
            if len(ctx) < 2:
                continue
            r, c = np.nonzero(mask)
            kw = dict(n_boot=n_boot, seed=seed, clusters=r)
            row = {"k_lo": lo, "k_hi": hi, "prior_bin": name, "n_slots": len(r), "n_contexts": len(ctx)}
            row["prior_mean"] = float(prior[r, c].mean())
            for label, x in (
                ("p_correct", base["correct"][r, c]),
                ("p_flipped", base["flipped"][r, c]),
                ("gap", base["correct"][r, c] - base["flipped"][r, c]),
                ("sides_with_prior", pred_true_f[r, c].astype(float)),
            ):
                m, l_, h_ = mean_ci(x, **kw)
                row.update({label: float(m), f"{label}_ci_low": float(l_), f"{label}_ci_high": float(h_)})
            for i, s in enumerate(sets):
                dc = sc.p_correct[i][r, c] - base["correct"][r, c]
                df = sc.p_flipped[i][r, c] - base["flipped"][r, c]
                out = dict(row, heads=fmt_heads(s))
                for label, x in (("d_correct", dc), ("d_flipped", df), ("closed", df - dc)):
                    m, l_, h_ = mean_ci(x, **kw)
                    out.update({label: float(m), f"{label}_ci_low": float(l_), f"{label}_ci_high": float(h_)})
                rows.append(out)
    return pd.DataFrame(rows)
