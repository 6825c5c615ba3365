"""Dose-response of competition: scale a head set's output at the readout slot and watch where predictions flip
(issue 28).

In the **flipped** rendering (every demonstration shows the other class's word), a head set's output at every
readout slot is replaced by

- ``kind="label"`` (label heads): ``z_correct + a (z_flipped - z_correct)``, the set's *label signal* scaled:
  ``a = 0`` is the correct rendering's output (interchange), ``a = 1`` the run itself, ``a = 3`` the flipped
  labels' pull three times over;
- ``kind="output"`` (prior heads): ``m + a (z_flipped - m)``, ``m`` the set's mean output at that slot over the
  flipped contexts: what the set says about *this* query scaled (``a = 0``: mean-ablated, condition-matched; a
  zero output would also remove what the head writes for every query, far off the model's distribution).

Per slot: ``LD(a) = logit(true) - logit(foil)`` (foil = the word the flipped rendering shows for the query) and
whether the prediction (argmax over the label words) is the foil: the model **sides with the labels**.

**The prediction** is linear in ``a`` from the two doses every decomposition measures (``a = 0`` and ``a = 1``):
``LD_pred(a) = LD(1) + (a - 1) (LD(1) - LD(0))``, slot by slot, so the share of queries that side with the labels is
predicted at the held-out doses (``a`` not 0 or 1). The **flip point** is the dose where the share siding with the
labels crosses 0.5 (linear interpolation between doses; NaN where it never crosses), measured and predicted, with
95% bootstrap CIs over contexts (a context's slots averaged first; the same draws for every dose:
``stats.bootstrap_means``), widened by the shared-row design effect; a flip-point interval reaching past the
largest dose is written ``inf`` (never flips in some draws) and is not widened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from mechicl.analysis.engine.hooks import Head, fmt_heads, head_masks
from mechicl.analysis.engine.slots import SlotStepper
from mechicl.analysis.prior.moderation import logit_diff
from mechicl.analysis.stats import bootstrap_means, mean_ci, percentile_interval, widen_for_shared_rows

SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
KINDS = ("label", "output")


@dataclass(frozen=True)
class DoseResult:
    """LD and the label-siding decision at every slot of the flipped rendering, per dose."""

    heads: str
    kind: str
    scales: Float[np.ndarray, "dose"]
    ld: Float[np.ndarray, "dose batch slot"]
    sides_with_labels: Float[np.ndarray, "dose batch slot"]  # 1 where the prediction is the shown (flipped) word
    k: Int[np.ndarray, "slot"]
    items: np.ndarray  # [b, n_examples] task rows: the shared-row design effect

    @property
    def predicted_ld(self) -> Float[np.ndarray, "dose batch slot"]:
        """The linear prediction from doses 0 and 1 only."""
        a = list(self.scales)
        l0, l1 = self.ld[a.index(0.0)], self.ld[a.index(1.0)]
        return l1[None] + (self.scales[:, None, None] - 1) * (l1 - l0)[None]


def _ld_and_side(logits: torch.Tensor, true: torch.Tensor, foil: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return logit_diff(logits, true, foil), (logits.argmax(-1) == foil).double().numpy()


@torch.no_grad()
def dose_response(
    correct: SlotStepper,
    flipped: SlotStepper,
    heads: Sequence[Head],
    *,
    scales: Sequence[float] = SCALES,
    kind: str = "label",
) -> DoseResult:
    """Scale ``heads``' output at every slot of ``flipped`` by each dose. Cost: one re-run per dose other than 1 (the
    flipped run's own logits), ``S`` one-token steps per context (``SlotStepper.run``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if 0.0 not in scales or 1.0 not in scales:
        raise ValueError(f"scales must include 0 and 1 (the prediction's two measured doses), got {tuple(scales)}")
    true, foil = correct.true_labels, flipped.batch.shown_labels[:, flipped.k_min :]
    mask = head_masks([heads], flipped.n_layers, flipped.n_heads)
    zc, zf = correct.z, flipped.z
    lds, sides = [], []
    m = zf.mean(0, keepdim=True)  # the condition mean a prior set's output is scaled about
    for a in scales:
        src = zc + a * (zf - zc) if kind == "label" else m + a * (zf - m)
        logits = flipped.base_logits if a == 1.0 else flipped.run(mask, src)[0]  # x1 is the flipped run itself
        ld, side = _ld_and_side(logits, true, foil)
        lds.append(ld)
        sides.append(side)
    k = np.arange(flipped.k_min, flipped.k_min + flipped.n_slots)
    items = flipped.batch.example_ids.numpy()
    return DoseResult(fmt_heads(heads), kind, np.asarray(scales, float), np.stack(lds), np.stack(sides), k, items)


def flip_point(scales: Float[np.ndarray, "dose"], share: Float[np.ndarray, "dose ..."]) -> np.ndarray:
    """The first dose where ``share - 0.5`` changes sign, linearly interpolated; NaN where it never does
    (an exact 0.5 at a dose is that dose)."""
    d = np.asarray(share, float) - 0.5
    out = np.full(d.shape[1:], np.nan)
    for i in range(len(scales) - 1, 0, -1):  # walk back so the first crossing wins
        a, b = d[i - 1], d[i]
        hit = (a == 0) | (a * b < 0)
        with np.errstate(all="ignore"):
            t = np.where(a == 0, 0.0, a / (a - b))
        out = np.where(hit, scales[i - 1] + t * (scales[i] - scales[i - 1]), out)
    return out


def dose_table(
    res: DoseResult, k_groups: Sequence[tuple[int, int]], *, n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """One row per (k group, dose): measured and predicted share siding with the labels and mean LD with CIs, and
    the group's measured and predicted flip points with CIs (repeated on each dose row)."""
    pred_side = (res.predicted_ld < 0).astype(float)
    rows = []
    for lo, hi in k_groups:
        cols = (res.k >= lo) & (res.k <= hi)
        if not cols.any():
            continue
        per_ctx = lambda x: x[:, :, cols].mean(-1)  # noqa: E731  [dose, b]: one value per context
        kw: dict = dict(n_boot=n_boot, seed=seed)
        flips = {}
        for name, x in (("measured", res.sides_with_labels), ("predicted", pred_side)):
            boot = bootstrap_means(per_ctx(x), **kw)  # [dose, n_boot], the same draws for every dose
            est = flip_point(res.scales, per_ctx(x).mean(-1))
            never = 1e9  # a draw whose curve never crosses: beyond every dose (an interval end there is inf)
            lo_, hi_ = percentile_interval(np.nan_to_num(flip_point(res.scales, boot), nan=never), 0.95)
            if max(lo_, hi_) < never and np.isfinite(est):
                lo_, hi_ = widen_for_shared_rows(est, lo_, hi_, res.items)
            lo_, hi_ = (np.inf if x >= never else x for x in (lo_, hi_))
            flips[name] = (float(est), float(lo_), float(hi_))
        for i, a in enumerate(res.scales):
            row = {"heads": res.heads, "kind": res.kind, "k_lo": lo, "k_hi": hi, "scale": float(a)}
            for label, x in (
                ("sides_with_labels", res.sides_with_labels[i]),
                ("predicted_sides", pred_side[i]),
                ("ld", res.ld[i]),
                ("predicted_ld", res.predicted_ld[i]),
            ):
                m, l_, h_ = mean_ci(per_ctx(x[None])[0], **kw, items=res.items)
                row.update({label: float(m), f"{label}_ci_low": float(l_), f"{label}_ci_high": float(h_)})
            for name, (e, l_, h_) in flips.items():
                row.update({f"flip_{name}": e, f"flip_{name}_ci_low": l_, f"flip_{name}_ci_high": h_})
            rows.append(row)
    return pd.DataFrame(rows)
