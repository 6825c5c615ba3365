"""Integrated gradients (IG) for attention attribution: the shared pieces and the comparison with patching.

Two IG analyses build on this module:

* ``analysis.gradients.attattr``: AttAttr (Hao et al. 2021, *Self-Attention Attribution*): one layer's attention
  patterns are scaled ``alpha * A`` from 0 to their value and ``Attr(A) = A * mean_alpha dF/dA(alpha A)``;
  per head, per query -> key pair; the attributions of a layer sum to ``F(A) - F(0 * A)``.
* ``analysis.gradients.path_ig``: IG along the patching path: per layer, the head outputs (``hook_z``) and the
  residual stream entering the layer move on the straight line from the flipped-label (corrupted) run
  to the correct-label (clean) run; the heads plus the rest sum to ``M(clean) - M(corrupted) = 1``.

**Riemann rule.** Both use the *midpoint* rule on ``m`` steps, ``alpha_i = (i - 1/2) / m``: its error
falls as ``1/m^2`` for smooth integrands (left/right endpoints fall as ``1/m``) and it is exact at
``m = 1`` when the metric is linear in the interpolated quantity (the gradient is then constant).
All ``alpha`` steps of one layer run side by side along the batch axis (contexts repeated), chunked to
``max_rows`` rows per forward; two extra rows per chunk set evaluate the path's endpoints
(``alpha = 0`` and ``1``), so completeness is checked against the same forward code.

The metric (``label_metric``) is the answer - foil logit difference at the query readout slot (or
P(answer) over the label set), per context. ``ranking_comparison`` and ``sign_disagreements`` set IG
and first-order attribution patching beside exact patching.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechicl.analysis.engine.readout import unembed_labels
from mechicl.analysis.patching.attribution import agreement
from mechicl.data.names import head_name

METRICS = ("logit_diff", "prob")


def midpoints(steps: int) -> Float[Tensor, "steps"]:
    """The midpoint rule's ``alpha_i = (i - 1/2) / m``, ``i = 1..m``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (the number of Riemann steps), got {steps}")
    return (torch.arange(steps, dtype=torch.float32) + 0.5) / steps


def alpha_rows(steps: int) -> Float[Tensor, "n"]:
    """The ``m`` midpoints followed by the two endpoints 0 and 1 (rows evaluated but not averaged)."""
    return torch.cat([midpoints(steps), torch.tensor([0.0, 1.0])])


def chunks(n: int, per: int) -> list[slice]:
    """``range(n)`` cut into slices of at most ``per``."""
    per = max(1, per)
    return [slice(i, min(n, i + per)) for i in range(0, n, per)]


def label_metric(
    model: Any,
    resid_q: Float[Tensor, "row d_model"],
    label_ids: Int[Tensor, "n_labels"],
    answer: Int[Tensor, "row"],
    foil: Int[Tensor, "row"],
    metric: str = "logit_diff",
) -> Float[Tensor, "row"]:
    """Per row: logit(answer) - logit(foil) over the label set (``logit_diff``) or P(answer) (``prob``).

    ``resid_q`` is the residual entering the final norm at the query readout slot; ``answer`` / ``foil``
    are class indices (into ``label_ids``).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    logits = unembed_labels(model, resid_q, label_ids).cpu()  # [row, n_labels], float32, differentiable
    rows = torch.arange(logits.shape[0])
    if metric == "prob":
        return torch.softmax(logits, -1)[rows, answer]
    return logits[rows, answer] - logits[rows, foil]


def _sign_agreement(est: np.ndarray, exact: np.ndarray, min_effect: float) -> float:
    keep = np.abs(exact) >= min_effect
    return float((np.sign(est[keep]) == np.sign(exact[keep])).mean()) if keep.any() else float("nan")


def ranking_comparison(
    exact: Float[Tensor, "layer head"],
    estimates: dict[str, Float[Tensor, "layer head"]],
    k: int = 10,
    min_effect: float = 0.01,
) -> pd.DataFrame:
    """Each estimate of the per-head patching effect against the exact effect.

    Columns: method, spearman, pearson, topk_overlap (top-``k`` heads by |effect|, shared / k),
    sign_agreement (share of heads with |exact effect| >= ``min_effect`` whose sign the estimate gets
    right), n_signed (how many heads that is). All effects on the normalised scale (0 = corrupted,
    1 = clean; denoising).
    """
    x = exact.reshape(-1).double().numpy()
    rows = []
    for name, est in estimates.items():
        a = agreement(est, exact, k)
        rows.append(
            {
                "method": name,
                "spearman": a["spearman"],
                "pearson": a["pearson"],
                "topk_overlap": a["topk_overlap"],
                "k": int(a["k"]),
                "sign_agreement": _sign_agreement(est.reshape(-1).double().numpy(), x, min_effect),
                "n_signed": int((np.abs(x) >= min_effect).sum()),
            }
        )
    return pd.DataFrame(rows)


def sign_disagreements(
    exact: Float[Tensor, "layer head"],
    first_order: Float[Tensor, "layer head"],
    ig: Float[Tensor, "layer head"],
    min_size: float = 0.0,
) -> pd.DataFrame:
    """Heads where first-order attribution patching and path IG disagree in sign, with the exact effect.

    ``min_size``: skip heads where both estimates are smaller than this. ``agrees_with_exact`` says which
    estimate has the exact effect's sign (``ig``, ``first_order``, or ``neither`` when exact is 0).
    """
    fo, g, x = first_order.double(), ig.double(), exact.double()
    bad = (torch.sign(fo) != torch.sign(g)) & ((fo.abs() >= min_size) | (g.abs() >= min_size))
    out = []
    for l, h in bad.nonzero().tolist():
        sx = torch.sign(x[l, h])
        who = (
            "ig"
            if sx == torch.sign(g[l, h]) and sx != 0
            else "first_order"
            if sx == torch.sign(fo[l, h]) and sx != 0
            else "neither"
        )
        out.append(
            {
                "layer": l,
                "head": h,
                "name": head_name(l, h),
                "first_order": float(fo[l, h]),
                "ig": float(g[l, h]),
                "exact": float(x[l, h]),
                "agrees_with_exact": who,
            }
        )
    cols = ["layer", "head", "name", "first_order", "ig", "exact", "agrees_with_exact"]
    return pd.DataFrame(out, columns=cols).sort_values("exact", key=np.abs, ascending=False, ignore_index=True)
