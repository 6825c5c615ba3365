"""Head ablation at the readout slot, the random-head-set control, function-vector effects, and the head finder.

**Ablation.** A head is ablated by replacing its output (``hook_z``) at the query
readout slot of every context: *zero* ablation writes 0, *mean* ablation writes its
mean output at that slot over the clean (correct-label) contexts. Only the query
slot changes, so ``ReadoutStepper`` re-runs one token per context per ablation.

**Gap reduction** (Halawi et al., 2024, "Overthinking the truth"). With accuracy
measured against the *true* label at the query slot::

    gap_reduction = 1 - (acc_correct - acc_flipped_ablated) / (acc_correct - acc_flipped)

0 = the ablation leaves flipped-label contexts as they were, 1 = it closes the gap
to correct-label contexts entirely (the model stops following the flipped labels).
``d_acc_correct`` is what the same ablation does to correct-label contexts, and
``d_acc_zero_shot`` what it does to the zero-shot prediction (the query alone, k = 0,
ablated at its readout slot with the same replacement): a head that carries in-context
label information, not the prior, leaves it near 0.

**Random control.** Every head set is compared with many random sets of the same
size drawn (seeded) from the other heads (exact when there are few such sets: for a single head,
every other head once); reported are the control mean, the 2.5-97.5%
range of the draws (``control_ci_low/high``) and the one-sided empirical p-value of
the set against the draws.

**Causal indirect effect** (Todd et al., 2024, function vectors). Each head's mean
output at the query slot over correct-label contexts is patched into contexts whose
demonstration labels are shuffled; the effect is the rise in P(true label)
(probabilities over the label set), with a t-interval over contexts.

**Head finder** (``find_heads``): attribution patching screens every head, exact
patching confirms the top candidates, ablation on held-out contexts validates them
against the random control (``analysis.heads.old_finder``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechicl.analysis.engine.hooks import Head, fmt_heads, head_masks
from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.analysis.stats import bootstrap_indices, percentile_interval, t_interval
from mechicl.data.batches import AblationBatches

ABLATIONS = ("zero", "mean")


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
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gap reduction of ``n`` ablations with a paired bootstrap over contexts (the same resampled
    contexts in all three accuracies); bootstrap draws without a gap are dropped. ``[n]`` each."""
    ac, af = np.asarray(acc_correct, dtype=float), np.asarray(acc_flipped, dtype=float)
    fa = np.asarray(acc_flipped_ablated, dtype=float)
    est = gap_reduction(ac.mean(), af.mean(), fa.mean(-1))
    if n_boot <= 0:
        nan = np.full(fa.shape[0], np.nan)
        return est, nan, nan
    idx = bootstrap_indices(len(ac), n_boot, seed)
    boot = gap_reduction(ac[idx].mean(-1)[None], af[idx].mean(-1)[None], fa[:, idx].mean(-1))  # [n, n_boot]
    lo, hi = percentile_interval(boot, level)
    return est, lo, hi


# ---------------------------------------------------------------- ablator ---


class HeadAblator:
    """Ablations and function-vector effects on one set of held-out contexts.

    Holds a ``ReadoutStepper`` for each rendering of ``AblationBatches`` (correct and flipped
    labels, each query alone at k = 0, and, on first use, shuffled labels). Cost: one forward per rendering on construction; each ablated head set then costs one one-token step per context
    (KV path) or one forward (fallback). Memory: the steppers' prefix caches.
    """

    def __init__(self, model: Any, batches: AblationBatches, *, max_rows: int = 256) -> None:
        self.model, self.batches, self.max_rows = model, batches, max_rows
        self.L, self.H = int(model.cfg.n_layers), int(model.cfg.n_heads)
        self.correct = ReadoutStepper(model, batches.correct, max_rows=max_rows)
        self.flipped = ReadoutStepper(model, batches.flipped, max_rows=max_rows)
        self.zero_shot = ReadoutStepper(model, batches.zero_shot, max_rows=max_rows)
        self._shuffled: ReadoutStepper | None = None
        self.target = self.correct.batch.true_labels[:, -1]  # true label of each query
        self.mean_z = self.correct.z.mean(0)  # [layer, head, d_head]: mean output at the query slot, clean distribution
        self.base = {
            c: {k: v[0] for k, v in self._score(getattr(self, c).base_logits[None]).items()}
            for c in ("correct", "flipped", "zero_shot")
        }

    @property
    def n_contexts(self) -> int:
        return int(self.target.shape[0])

    @property
    def shuffled(self) -> ReadoutStepper:
        """The shuffled-label rendering's stepper (built on first use: only function vectors need it)."""
        if self._shuffled is None:
            self._shuffled = ReadoutStepper(self.model, self.batches.shuffled, max_rows=self.max_rows)
        return self._shuffled

    def _score(self, logits: Float[Tensor, "n batch n_labels"]) -> dict[str, np.ndarray]:
        """Per-context correctness and P(true label) against the query's true label."""
        p = torch.softmax(logits.double(), -1)
        tgt = self.target.expand(logits.shape[0], -1)
        return {
            "correct": (logits.argmax(-1) == tgt).numpy(),
            "p_true": p.gather(-1, tgt[..., None])[..., 0].numpy(),
        }

    def _source(self, ablation: str) -> Tensor | None:
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
        return None if ablation == "zero" else self.mean_z

    def ablate(
        self,
        sets: Sequence[Sequence[Head]],
        ablation: str = "mean",
        conditions: Sequence[str] = ("correct", "flipped"),
        progress: bool = False,
    ) -> dict[str, dict[str, np.ndarray]]:
        """Per-context scores ``[n_sets, batch]`` under each head set's ablation, per condition."""
        masks = head_masks(sets, self.L, self.H)
        src = self._source(ablation)
        return {c: self._score(getattr(self, c).run(masks, src, progress=progress)) for c in conditions}

    def gap_table(
        self,
        sets: Sequence[Sequence[Head]],
        ablation: str = "mean",
        n_boot: int = 1000,
        seed: int = 0,
        with_correct: bool = True,
    ) -> pd.DataFrame:
        """Gap reduction (accuracy and P(true)) with a bootstrap CI over contexts; Δ correct-label and zero-shot accuracy."""
        conds = ("correct", "flipped", "zero_shot") if with_correct else ("flipped",)
        res = self.ablate(sets, ablation, conds)
        bc, bf = self.base["correct"], self.base["flipped"]
        acc_c, _acc_f = bc["correct"].mean(), bf["correct"].mean()
        p_c, p_f = bc["p_true"].mean(), bf["p_true"].mean()
        fa = res["flipped"]["correct"]  # [n, batch]
        gr, lo, hi = gap_reduction_ci(bc["correct"], bf["correct"], fa, n_boot, seed)
        gr_p = gap_reduction(p_c, p_f, res["flipped"]["p_true"].mean(1))
        df = pd.DataFrame(
            {
                "heads": [fmt_heads(s) for s in sets],
                "size": [len(s) for s in sets],
                "ablation": ablation,
                "gap_reduction": gr,
                "gap_reduction_ci_low": lo,
                "gap_reduction_ci_high": hi,
                "gap_reduction_ptrue": gr_p,
                "acc_flipped_ablated": fa.mean(1),
            }
        )
        if with_correct:
            df["d_acc_correct"] = res["correct"]["correct"].mean(1) - acc_c
            df["d_acc_zero_shot"] = res["zero_shot"]["correct"].mean(1) - self.base["zero_shot"]["correct"].mean()
        return df

    def random_control(
        self, size: int, n_draws: int, seed: int = 0, exclude: Sequence[Head] = (), ablation: str = "mean"
    ) -> pd.DataFrame:
        """Gap reduction of ``n_draws`` random head sets of ``size`` heads (none from ``exclude``); seeded.

        When the pool has no more than ``n_draws`` sets of that size (always for ``size == 1``:
        every other head once), the control is exact instead: each possible set once.
        """
        pool = [(l, h) for l in range(self.L) for h in range(self.H) if (l, h) not in set(exclude)]
        if size > len(pool):
            raise ValueError(f"cannot draw {size} heads from a pool of {len(pool)}")
        if size == 1 or math.comb(len(pool), size) <= n_draws:
            sets = [list(c) for c in itertools.combinations(pool, size)]
        else:
            rng = np.random.default_rng([seed, size])
            sets = [sorted(pool[i] for i in rng.choice(len(pool), size=size, replace=False)) for _ in range(n_draws)]
        n_draws = len(sets)
        df = self.gap_table(sets, ablation, n_boot=0, with_correct=False)
        df.insert(0, "draw", np.arange(n_draws))
        return df.drop(columns=["gap_reduction_ci_low", "gap_reduction_ci_high"])

    def function_vector_effects(self, progress: bool = False) -> pd.DataFrame:
        """Todd et al.'s causal indirect effect of every head (mean clean output -> shuffled-label contexts)."""
        st = self.shuffled
        heads = [(l, h) for l in range(self.L) for h in range(self.H)]
        tgt = self.target
        base = torch.softmax(st.base_logits.double(), -1).gather(-1, tgt[:, None])[:, 0].numpy()
        logits = st.run(head_masks([[x] for x in heads], self.L, self.H), self.mean_z, progress=progress)
        p = torch.softmax(logits.double(), -1).gather(-1, tgt.expand(len(heads), -1)[..., None])[..., 0].numpy()
        rows = []
        for i, (l, h) in enumerate(heads):
            m, lo, hi = t_interval(p[i] - base)
            rows.append({"layer": l, "head": h, "fv_cie": m, "fv_cie_ci_low": lo, "fv_cie_ci_high": hi})
        return pd.DataFrame(rows)


def summarize_control(value: float, draws: np.ndarray) -> dict[str, float]:
    """Control mean, 2.5-97.5% range of the draws, and the one-sided empirical p-value of ``value``."""
    d = draws[~np.isnan(draws)]
    if d.size == 0:
        return {
            "control_mean": np.nan,
            "control_ci_low": np.nan,
            "control_ci_high": np.nan,
            "control_p": np.nan,
            "n_draws": 0,
        }
    return {
        "control_mean": float(d.mean()),
        "control_ci_low": float(np.percentile(d, 2.5)),
        "control_ci_high": float(np.percentile(d, 97.5)),
        "control_p": float((1 + (d >= value).sum()) / (1 + d.size)),
        "n_draws": int(d.size),
    }
