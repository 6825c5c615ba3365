"""Resample ablation of head sets at every readout slot, on correct- and flipped-label renderings.

**Metric.** P(true label) (softmax over the label words) at every readout slot with ``k >= k_min``.
Per context ``c`` (means over its slots ``s``)::

    gap_c    = mean_s [P_correct - P_flipped]                              (the in-context label effect)
    closed_c = mean_s [(P_correct - P_flipped) - (P_correct^abl - P_flipped^abl)]

and a head set's **effect** is ``mean_c closed_c / mean_c gap_c``: the share of the correct-vs-flipped
difference that ablating the set removes (0: none, 1: all). Intervals resample contexts
(``analysis.stats.resampling``). Halawi et al.'s **gap reduction** (accuracy at the last slot, flipped
contexts only) is kept as the secondary, comparable number.

**Resample ablation.** A head's output at slot ``s`` of context ``c`` is replaced by its output at
the same slot of another context of the same condition (a seeded derangement of the contexts),
averaged over ``n_resample`` derangements: it removes what the head says about *this* context
without transplanting another condition's answer. ``ablation="mean"`` uses the mean output at that
slot over both conditions instead; ``"zero"`` writes zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechicl.analysis.engine.hooks import Head, fmt_heads, head_masks
from mechicl.analysis.engine.slots import SlotStepper
from mechicl.analysis.heads.ablation import gap_reduction_ci
from mechicl.analysis.stats import mean_ci, ratio_ci
from mechicl.data.prompts import PromptBatch

CONDITIONS = ("correct", "flipped")
SLOT_ABLATIONS = ("resample", "mean", "zero")


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


@dataclass(frozen=True)
class SetScores:
    """Per-context results of ablating head sets (means over slots, and over resample draws).

    ``closed [n, b]``, ``d_correct``/``d_flipped [n, b]`` (ΔP(true)), ``acc_flipped_last [n, b]``
    (accuracy at the last slot of flipped contexts, ablated).
    """

    names: list[str]
    closed: np.ndarray
    d_correct: np.ndarray
    d_flipped: np.ndarray
    acc_flipped_last: np.ndarray


class SlotAblation:
    """Head-set ablation at every slot ``k >= k_min`` of one draw of contexts, both conditions.

    Cost: 2 forwards (one per condition) on construction; each head set then costs
    ``2 x n_resample x S`` one-token steps per context (``SlotStepper``). Memory: two steppers (the KV
    caches of both renderings), plus one step's activations: ``step_tokens`` appended tokens per step
    (on a Gemma-3-270M vader-words cell, 8192 gave a 0.22 GB higher peak and no speed-up: ``docs/findings.md``).
    """

    def __init__(
        self,
        model: Any,
        correct: PromptBatch,
        flipped: PromptBatch,
        k_min: int,
        *,
        ablation: str = "resample",
        n_resample: int = 2,
        seed: int = 0,
        step_tokens: int = 2048,
    ) -> None:
        if ablation not in SLOT_ABLATIONS:
            raise ValueError(f"ablation must be one of {SLOT_ABLATIONS}, got {ablation!r}")
        if not torch.equal(correct.example_ids, flipped.example_ids):
            raise ValueError("the correct and flipped renderings must hold the same contexts")
        self.ablation = ablation
        self.st = {
            c: SlotStepper(model, b, k_min, step_tokens=step_tokens) for c, b in zip(CONDITIONS, (correct, flipped))
        }
        self.L, self.H = self.st["correct"].L, self.st["correct"].H
        self.labels = self.st["correct"].true_labels  # [b, S]
        self.base = {c: p_true(s.base_logits, self.labels).numpy() for c, s in self.st.items()}  # [b, S]
        self.gap = (self.base["correct"] - self.base["flipped"]).mean(1)  # [b]
        n = self.n_contexts
        self.donors = derangements(n, n_resample if ablation == "resample" else 1, seed)
        both = torch.cat([s.z for s in self.st.values()], 0)  # [2b, S, L, H, d]
        self._mean = both.mean(0, keepdim=True).expand_as(self.st["correct"].z)
        self.acc_last = {
            c: (self.st[c].base_logits[:, -1].argmax(-1) == self.labels[:, -1]).numpy() for c in CONDITIONS
        }

    @property
    def n_contexts(self) -> int:
        return int(self.labels.shape[0])

    def sources(self, cond: str) -> list[Tensor | None]:
        """The replacement at every slot, one per resample draw."""
        if self.ablation == "zero":
            return [None]
        if self.ablation == "mean":
            return [self._mean]
        return [self.st[cond].z[d] for d in self.donors]

    def scores(self, sets: Sequence[Sequence[Head]], progress: bool = False) -> SetScores:
        """Ablate each set at every slot (both conditions, every resample draw); per-context results."""
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
        )

    def attribution(self) -> Float[np.ndarray, "batch layer head"]:
        """First-order estimate of ``closed_c`` for every single head (one backward per condition, first draw)."""
        est = {c: self.st[c].attribution(self.sources(c)[0], p_true).numpy() for c in CONDITIONS}  # [b, S, L, H]
        return -(est["correct"] - est["flipped"]).mean(1)

    def table(self, sc: SetScores, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
        """Effect (share of the gap closed) with CI, ΔP(true) per condition, Halawi gap reduction; one row per set."""
        eff, lo, hi = ratio_ci(sc.closed, self.gap, n_boot=n_boot, seed=seed)
        dc, dc_lo, dc_hi = mean_ci(sc.d_correct, n_boot=n_boot, seed=seed)
        df, df_lo, df_hi = mean_ci(sc.d_flipped, n_boot=n_boot, seed=seed)
        gr, gr_lo, gr_hi = gap_reduction_ci(
            self.acc_last["correct"], self.acc_last["flipped"], sc.acc_flipped_last, n_boot, seed
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
        """Mean norm of each head's output ``z W_O`` over slots and contexts (both conditions): norm matching."""
        z = torch.cat([s.z for s in self.st.values()], 0)  # [2b, S, L, H, d]
        out = np.zeros((self.L, self.H))
        for l in range(self.L):
            W_O = model.blocks[l].attn.W_O.detach().to(z.dtype)  # [H, d, d_model]
            out[l] = torch.einsum("bshd,hdm->bshm", z[:, :, l], W_O).norm(dim=-1).mean((0, 1)).numpy()
        return out
