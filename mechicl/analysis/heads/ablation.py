"""Head ablation: a mode (how a head's output is replaced) at a set of readout slots, on correct- and
flipped-label renderings of the same contexts. The one ablation of the package: the finder, the report
and the organisms' pruning all call ``HeadAblation``.

**Slots.** Every readout slot with ``k >= k_min`` (``k_min = k``: the query slot alone), re-run by one
``SlotStepper`` per rendering; a head's output (``hook_z``) is replaced at those slots only.

**Modes** (``MODES``, an open set: a mode is a function of the ablation and the condition that returns
the replacement of ``z`` at every slot, one tensor per draw, ``None`` = zeros):

- ``resample``: the head's output at the same slot of another context of the same condition (a seeded
  derangement of the contexts), averaged over ``n_resample`` derangements: it removes what the head says
  about *this* context without transplanting another condition's answer;
- ``mean``: its mean output at that slot over both renderings' contexts;
- ``mean_correct``: its mean output at that slot over the correct-label contexts (Todd et al.'s clean
  mean; the organisms' pruning stage uses it);
- ``zero``: zeros;
- ``mean_condition``: its mean output at that slot over the same condition's contexts (condition-matched
  mean: a flipped context gets the flipped contexts' mean, so nothing of the other condition is written in);
- ``interchange``: its output at that slot of the *same* context rendered in the other condition (correct-label
  contexts get the flipped rendering's output and vice versa): the head's whole label-condition signal swapped.

**Effect.** P(true label) (softmax over the label words) at every slot. Per context ``c`` (means over
its slots ``s``)::

    gap_c    = mean_s [P_correct - P_flipped]                              (the in-context label effect)
    closed_c = mean_s [(P_correct - P_flipped) - (P_correct^abl - P_flipped^abl)]

and a head set's **effect** is ``mean_c closed_c / mean_c gap_c``: the share of the correct-vs-flipped
difference that ablating the set removes (0: none, 1: all), with a context bootstrap CI
(``analysis.stats.ratio_ci``). Halawi et al.'s **gap reduction** (accuracy against the true
label at the last slot; flipped contexts ablated) is the secondary, comparable number::

    gap_reduction = 1 - (acc_correct - acc_flipped_ablated) / (acc_correct - acc_flipped)
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechicl.analysis.engine.hooks import Head, fmt_heads, head_masks
from mechicl.analysis.engine.slots import SlotStepper
from mechicl.analysis.inside.dla import frozen_norm, norm_affine
from mechicl.analysis.stats import bootstrap_indices, mean_ci, percentile_interval, ratio_ci, widen_for_shared_rows
from mechicl.data.prompts import PromptBatch

CONDITIONS = ("correct", "flipped")


def p_true(logits: Float[Tensor, "... labels"], labels: Tensor) -> Float[Tensor, "..."]:
    """P(true label) with probabilities over the label words (float64)."""
    return torch.softmax(logits.double(), -1).gather(-1, labels.expand(*logits.shape[:-1])[..., None])[..., 0]


def derangements(n: int, n_draws: int, seed: int) -> list[Tensor]:
    """``n_draws`` seeded permutations of ``range(n)`` with no fixed point (donor ``perm[c] != c``)."""
    if n < 2:
        raise ValueError("resample ablation needs at least 2 contexts (a donor other than the context itself)")
    rng = np.random.default_rng([seed, 31])
    out = []
    while len(out) < n_draws:
        p = rng.permutation(n)
        if (p != np.arange(n)).all():
            out.append(torch.as_tensor(p))
    return out


def gap_reduction(acc_correct: Any, acc_flipped: Any, acc_flipped_ablated: Any) -> Any:
    """Halawi et al.'s gap reduction; NaN where there is no gap (acc_correct <= acc_flipped)."""
    gap = np.asarray(acc_correct, dtype=float) - np.asarray(acc_flipped, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1.0 - (np.asarray(acc_correct, dtype=float) - np.asarray(acc_flipped_ablated, dtype=float)) / gap
    return np.where(gap > 0, out, np.nan)


def gap_reduction_ci(
    acc_correct: Float[np.ndarray, "batch"],
    acc_flipped: Float[np.ndarray, "batch"],
    acc_flipped_ablated: Float[np.ndarray, "n batch"],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    items: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gap reduction of ``n`` ablations with a paired bootstrap over contexts (the same resampled
    contexts in all three accuracies); bootstrap draws without a gap are dropped. ``[n]`` each. With ``items``
    (each context's task rows) the interval is widened by the shared-row design effect."""
    ac, af = np.asarray(acc_correct, dtype=float), np.asarray(acc_flipped, dtype=float)
    fa = np.asarray(acc_flipped_ablated, dtype=float)
    est = gap_reduction(ac.mean(), af.mean(), fa.mean(-1))
    if n_boot <= 0:
        nan = np.full(fa.shape[0], np.nan)
        return est, nan, nan
    idx = bootstrap_indices(len(ac), n_boot, seed)
    boot = gap_reduction(ac[idx].mean(-1)[None], af[idx].mean(-1)[None], fa[:, idx].mean(-1))  # [n, n_boot]
    lo, hi = percentile_interval(boot, level)
    lo, hi = widen_for_shared_rows(est, lo, hi, items)
    return est, lo, hi


# ------------------------------------------------------------------ modes ---

Mode = Callable[["HeadAblation", str], list[Tensor | None]]
"""A mode: (the ablation, the condition) -> the replacement of ``z [b, S, L, H, d]`` per draw (None = zeros)."""


def _resample(abl: HeadAblation, cond: str) -> list[Tensor | None]:
    return [abl.z[cond][d] for d in abl.donors]


def _mean(abl: HeadAblation, cond: str) -> list[Tensor | None]:
    both = torch.cat([abl.z[c] for c in CONDITIONS], 0)  # [2b, S, L, H, d]
    return [both.mean(0, keepdim=True).expand_as(abl.z[cond])]


def _mean_correct(abl: HeadAblation, cond: str) -> list[Tensor | None]:
    return [abl.z["correct"].mean(0, keepdim=True).expand_as(abl.z[cond])]


def _zero(abl: HeadAblation, cond: str) -> list[Tensor | None]:
    return [None]


def _mean_condition(abl: HeadAblation, cond: str) -> list[Tensor | None]:
    return [abl.z[cond].mean(0, keepdim=True).expand_as(abl.z[cond])]


def _interchange(abl: HeadAblation, cond: str) -> list[Tensor | None]:
    return [abl.z[CONDITIONS[1 - CONDITIONS.index(cond)]]]  # the other rendering of the same contexts


MODES: dict[str, Mode] = {
    "resample": _resample,
    "mean": _mean,
    "mean_correct": _mean_correct,
    "zero": _zero,
    "mean_condition": _mean_condition,
    "interchange": _interchange,
}


@dataclass(frozen=True)
class SetScores:
    """Per-context results of ablating head sets (means over slots, and over resample draws).

    ``closed [n, b]``, ``d_correct``/``d_flipped [n, b]`` (ΔP(true)), ``acc_flipped_last [n, b]``
    (accuracy at the last slot of flipped contexts, ablated); ``p_correct``/``p_flipped [n, b, S]``: the ablated
    P(true) at every slot (``analysis.prior.moderation`` bins slots by their query's prior).
    """

    names: list[str]
    closed: np.ndarray
    d_correct: np.ndarray
    d_flipped: np.ndarray
    acc_flipped_last: np.ndarray
    p_correct: np.ndarray | None = None  # [n, b, S]: P(true) at every slot, ablated (per-slot analyses)
    p_flipped: np.ndarray | None = None


class HeadAblation:
    """Head-set ablation in one ``mode`` at every slot ``k >= k_min`` of one draw of contexts, both conditions.

    Cost: 2 forwards (one per condition) on construction; each head set then costs
    ``2 x draws x S`` one-token steps per context (``SlotStepper``; draws = ``n_resample`` for resample,
    else 1). Memory: two steppers (the KV caches of both renderings), plus one step's activations:
    ``step_tokens`` appended tokens per step (on a Gemma-3-270M vader-words cell, 8192 gave a 0.22 GB
    higher peak and no speed-up: ``docs/findings.md``). ``spill``: a folder; each stepper's KV cache is kept
    in a file there and read back per call, a range of contexts at a time (``SlotStepper.spill``), so at most a
    slice of one cache is in memory.
    """

    def __init__(
        self,
        model: Any,
        correct: PromptBatch,
        flipped: PromptBatch,
        k_min: int,
        *,
        mode: str = "resample",
        n_resample: int = 2,
        seed: int = 0,
        step_tokens: int = 2048,
        spill: Path | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"ablation mode must be one of {tuple(MODES)}, got {mode!r}")
        if not torch.equal(correct.example_ids, flipped.example_ids):
            raise ValueError("the correct and flipped renderings must hold the same contexts")
        self.mode, self.n_resample, self.seed = mode, n_resample, seed
        self.st = {}
        for c, b in zip(CONDITIONS, (correct, flipped)):
            self.st[c] = SlotStepper(model, b, k_min, step_tokens=step_tokens)
            if spill is not None:  # out of memory before the next is built
                self.st[c].spill(spill / f"kv-{uuid.uuid4().hex}-{c}.bin")
        self.z = {c: s.z for c, s in self.st.items()}  # [b, S, L, H, d] each: head outputs at the slots
        self.L, self.H = self.st["correct"].n_layers, self.st["correct"].n_heads
        self.labels = self.st["correct"].true_labels  # [b, S]
        self.items = correct.example_ids.numpy()  # [b, n_examples]: task rows, for the shared-row design effect
        self.base = {c: p_true(s.base_logits, self.labels).numpy() for c, s in self.st.items()}  # [b, S]
        self.gap = (self.base["correct"] - self.base["flipped"]).mean(1)  # [b]
        self.donors = derangements(self.n_contexts, n_resample if mode == "resample" else 1, seed)
        self.acc_last = {
            c: (self.st[c].base_logits[:, -1].argmax(-1) == self.labels[:, -1]).numpy() for c in CONDITIONS
        }

    @property
    def n_contexts(self) -> int:
        return int(self.labels.shape[0])

    def with_mode(self, mode: str) -> HeadAblation:
        """The same contexts, steppers and caches under another ``mode`` (no forward; donors re-drawn from
        the seed): how one draw is scored under several interventions (``analysis.heads.roles``)."""
        if mode not in MODES:
            raise ValueError(f"ablation mode must be one of {tuple(MODES)}, got {mode!r}")
        other = copy.copy(self)
        other.mode = mode
        other.donors = derangements(self.n_contexts, self.n_resample if mode == "resample" else 1, self.seed)
        return other

    def sources(self, cond: str) -> list[Tensor | None]:
        """The replacement at every slot, one per draw (``MODES[self.mode]``)."""
        return MODES[self.mode](self, cond)

    def scores(self, sets: Sequence[Sequence[Head]], progress: bool = False) -> SetScores:
        """Ablate each set at every slot (both conditions, every draw); per-context results."""
        masks = head_masks(sets, self.L, self.H)
        p, acc = {}, None
        for c in CONDITIONS:
            runs = [self.st[c].run(masks, src, progress=progress) for src in self.sources(c)]  # [n, b, S, labels] each
            p[c] = np.mean([p_true(r, self.labels).numpy() for r in runs], 0)  # [n, b, S]
            if c == "flipped":
                acc = np.mean([(r[:, :, -1].argmax(-1) == self.labels[:, -1]).numpy() for r in runs], 0)  # [n, b]
        base_diff = self.base["correct"] - self.base["flipped"]
        return SetScores(
            names=[fmt_heads(s) for s in sets],
            closed=(base_diff[None] - (p["correct"] - p["flipped"])).mean(-1),
            d_correct=(p["correct"] - self.base["correct"][None]).mean(-1),
            d_flipped=(p["flipped"] - self.base["flipped"][None]).mean(-1),
            acc_flipped_last=acc,
            p_correct=p["correct"],
            p_flipped=p["flipped"],
        )

    def attribution(self) -> Float[np.ndarray, "batch layer head"]:
        """First-order estimate of ``closed_c`` for every single head (one backward per condition, first draw)."""
        est = {c: self.st[c].attribution(self.sources(c)[0], p_true).numpy() for c in CONDITIONS}  # [b, S, L, H]
        return -(est["correct"] - est["flipped"]).mean(1)

    def table(self, sc: SetScores, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
        """Effect (share of the gap closed) with CI, ΔP(true) per condition, Halawi gap reduction; one row per set.
        Intervals: context bootstrap widened by the shared-row design effect of the contexts' task rows."""
        kw = dict(n_boot=n_boot, seed=seed, items=self.items)  # contexts share task rows: widened intervals
        eff, lo, hi = ratio_ci(sc.closed, self.gap, **kw)
        dc, dc_lo, dc_hi = mean_ci(sc.d_correct, **kw)
        df, df_lo, df_hi = mean_ci(sc.d_flipped, **kw)
        gr, gr_lo, gr_hi = gap_reduction_ci(
            self.acc_last["correct"], self.acc_last["flipped"], sc.acc_flipped_last, n_boot, seed, items=self.items
        )
        return pd.DataFrame(
            {
                "heads": sc.names,
                "effect": eff,
                "effect_ci_low": lo,
                "effect_ci_high": hi,
                "d_p_correct": dc,
                "d_p_correct_ci_low": dc_lo,
                "d_p_correct_ci_high": dc_hi,
                "d_p_flipped": df,
                "d_p_flipped_ci_low": df_lo,
                "d_p_flipped_ci_high": df_hi,
                "gap_reduction": gr,
                "gap_reduction_ci_low": gr_lo,
                "gap_reduction_ci_high": gr_hi,
            }
        )

    def head_norms(self, model: Any) -> Float[np.ndarray, "layer head"]:
        """Mean norm of each head's output over slots and contexts (both conditions): what controls are matched on.

        The output as the residual stream receives it: ``z W_O``, and on models with a post-attention norm
        (Gemma-3) that norm applied with its scale frozen from the run (``out * gain / scale``), so norms compare
        across layers whose norms rescale the heads differently (issue 27)."""
        z = torch.cat([self.z[c] for c in CONDITIONS], 0)  # [2b, S, L, H, d]
        post = [self.st[c].post_scale for c in CONDITIONS]
        scale = torch.cat(post, 0).to(z.dtype) if post[0] is not None else None  # [2b, S, L]
        out = np.zeros((self.L, self.H))
        for l in range(self.L):
            W_O = model.blocks[l].attn.W_O.detach().to(z.dtype)  # [H, d, d_model]
            o = torch.einsum("bshd,hdm->bshm", z[:, :, l], W_O)
            if scale is not None:
                gain, _, centers = norm_affine(model.blocks[l].ln1_post)
                o = frozen_norm(o, scale[:, :, l, None, None], gain.to(o.dtype), centers)
            out[l] = o.norm(dim=-1).mean((0, 1)).numpy()
        return out
