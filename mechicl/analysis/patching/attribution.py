"""Attribution patching: a first-order estimate of every patch from one gradient.

For a patch of activation ``a`` (receiver value ``a_r``, donor value ``a_d``) the
change of the metric is estimated as ``(a_d - a_r) . dM/da`` evaluated on the
receiver run (Nanda 2023; Syed et al. 2023). One backward pass gives the gradient
for every layer, head and position at once, so a whole sweep costs

    1 donor forward (no graph) + 1 receiver forward (with graph) + 1 backward,

for the whole batch. Parameters are frozen during the call, so the backward
computes activation gradients only (about one forward's worth of work instead of
two). Memory: the receiver run's autograd graph (all intermediate activations of
``batch x pos``) plus the donor activations of the swept hooks.

The metric ``M`` is the same normalised logit difference as in ``patching``
(0 = corrupted, 1 = clean; batch mean), so ``AttributionResult.values`` is the
estimated value of the patched run, directly comparable to ``PatchResult.values``.
The estimate is exact when ``M`` is linear in the patched activation (tested on
such a model) and degrades with non-linearities between the patch and the logits
(norms, attention softmax, MLPs); ``agreement`` quantifies that against exact patching.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy import stats
from torch import Tensor

from mechicl.analysis.engine.hooks import act_name, capture, grad_leaf, run_to_final, to_host
from mechicl.analysis.engine.readout import unembed_labels
from mechicl.analysis.patching.kinds import DIRECTIONS, KINDS
from mechicl.analysis.patching.result import cell_table, normalise
from mechicl.data.pairs import PatchPair


@dataclass(frozen=True)
class AttributionResult:
    """Estimated normalised metric of each patch, shaped like the exact ``PatchResult.values``.

    ``by_pos`` (head kinds only): the estimate's change per (layer, head, position)
    summed over contexts, before summing positions.
    """

    kind: str
    direction: str
    axes: tuple[str, str]
    values: Float[Tensor, "layer idx"]
    by_pos: Float[Tensor, "layer idx pos"] | None
    seconds: float

    @property
    def effect(self) -> Float[Tensor, "layer idx"]:
        return self.values - (0.0 if self.direction == "denoise" else 1.0)

    def table(self) -> pd.DataFrame:
        return cell_table(
            self.kind, self.direction, self.axes, attribution_value=self.values, attribution_effect=self.effect
        )


@contextlib.contextmanager
def _frozen(model: Any) -> Iterator[None]:
    """Parameters do not require grad inside (the backward then skips weight gradients)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _hook_names(kind: str, n_layers: int) -> list[str]:
    return [act_name(KINDS[kind].act, l) for l in range(n_layers)]


def attribution_patch(
    model: Any,
    pair: PatchPair,
    kinds: Sequence[str] = ("head_out",),
    direction: str = "denoise",
    *,
    max_rows: int = 4,
) -> dict[str, AttributionResult]:
    """Attribution-patching estimates for every cell of each of ``kinds`` (one backward for all).

    Cost: 2 forwards + 1 activation-only backward of the pair's batch, whatever ``kinds`` holds, run
    ``max_rows`` contexts at a time. The metric is a batch mean and contexts never meet in a forward, so each
    chunk's gradient of its summed logit difference is exact; the chunks' sums are scaled by the whole batch's
    normaliser at the end. Memory: one chunk's autograd graph (``max_rows x pos`` activations of every layer).
    """
    for k in kinds:
        if k not in KINDS:  # every sweep kind has a first-order estimate
            raise ValueError(f"unknown kind {k!r}; use one of {', '.join(KINDS)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    t0, _L, W, b = time.perf_counter(), int(model.cfg.n_layers), int(pair.query_pos.max()) + 1, pair.n_contexts
    sums: dict[str, list[Tensor]] = {}
    pos_sums: dict[str, list[Tensor]] = {}
    d_lds, r_lds = [], []
    for lo in range(0, b, max_rows):
        idx = list(range(lo, min(b, lo + max_rows)))
        sub = PatchPair(pair.clean.select(idx), pair.corrupted.select(idx), pair.answer[idx], pair.foil[idx])
        d_ld, r_ld, per_kind = _chunk(model, sub, kinds, direction, W)
        d_lds.append(d_ld), r_lds.append(r_ld)
        for kind, (per_layer, per_pos) in per_kind.items():
            sums[kind] = [a + x for a, x in zip(sums[kind], per_layer)] if kind in sums else per_layer
            if per_pos:
                pos_sums[kind] = [a + x for a, x in zip(pos_sums[kind], per_pos)] if kind in pos_sums else per_pos
    d_ld, r_ld = torch.cat(d_lds), torch.cat(r_lds)
    clean_ld, corr_ld = (d_ld, r_ld) if direction == "denoise" else (r_ld, d_ld)
    base = normalise(r_ld, clean_ld, corr_ld)
    scale = 1.0 / (b * (clean_ld.mean() - corr_ld.mean()))  # d metric / d (one context's LD)
    out: dict[str, AttributionResult] = {}
    for kind in kinds:
        per_pos = torch.stack(pos_sums[kind]) * scale if kind in pos_sums else None
        out[kind] = AttributionResult(
            kind, direction, KINDS[kind].axes, base + torch.stack(sums[kind]) * scale, per_pos, time.perf_counter() - t0
        )
    return out


def _chunk(
    model: Any, pair: PatchPair, kinds: Sequence[str], direction: str, width: int
) -> tuple[Tensor, Tensor, dict[str, tuple[list[Tensor], list[Tensor]]]]:
    """One chunk of contexts: donor and receiver LD ``[b]`` and, per kind, the per-cell sums of
    ``(a_d - a_r) . d(sum of receiver LD)/da`` (positions padded to ``width``). 2 forwards + 1 backward."""
    L, W = int(model.cfg.n_layers), int(pair.query_pos.max()) + 1
    recv, donor = (pair.corrupted, pair.clean) if direction == "denoise" else (pair.clean, pair.corrupted)
    names = list(dict.fromkeys(n for k in kinds for n in _hook_names(k, L)))
    rows, q = torch.arange(pair.n_contexts), pair.query_pos
    donor_store: dict[str, Tensor] = {}
    with torch.no_grad():
        d_resid = run_to_final(model, donor.tokens[:, :W], capture(names, donor_store))
        d_ld = pair.logit_diff(
            to_host(
                unembed_labels(
                    model, d_resid[rows.to(d_resid.device), q.to(d_resid.device)], pair.clean.label_token_ids
                )
            )
        )
    acts: dict[str, Tensor] = {}
    hooks = [("blocks.0.hook_resid_pre", grad_leaf), *capture(names, acts, grad=True)]
    with _frozen(model), torch.enable_grad():
        resid = run_to_final(model, recv.tokens[:, :W], hooks)
        r_ld = pair.logit_diff(
            unembed_labels(model, resid[rows.to(resid.device), q.to(resid.device)], pair.clean.label_token_ids).cpu()
        )  # float32, differentiable
        order = [n for n in names if n in acts and acts[n].requires_grad]
        grads = dict(zip(order, torch.autograd.grad(r_ld.sum(), [acts[n] for n in order], allow_unused=True)))
    out = {}
    for kind in kinds:
        deltas = {n: (donor_store[n] - acts[n].detach(), grads.get(n)) for n in _hook_names(kind, L)}
        per_layer, per_pos = _per_cell(kind, deltas, pair)
        out[kind] = (per_layer, [torch.nn.functional.pad(x, (0, width - x.shape[-1])) for x in per_pos])
    return d_ld, r_ld.detach(), out


def _per_cell(
    kind: str, deltas: dict[str, tuple[Tensor, Tensor | None]], pair: PatchPair
) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer: the estimate ``(a_d - a_r) . grad`` summed into the sweep's cells, and (head kinds) per position."""
    b = pair.n_contexts
    rows, q, lab = torch.arange(b), pair.query_pos, pair.clean.label_pos[:, :-1]  # lab: demonstration labels
    per_layer, per_pos = [], []
    for delta, g in deltas.values():
        prod = delta.float() * (
            g.float() if g is not None else torch.zeros_like(delta, dtype=torch.float32)
        )  # float32 sums
        if KINDS[kind].axes[1] == "pos":  # [b, pos, d_model]
            per_layer.append(to_host(prod.sum(-1).sum(0)))
        elif kind == "head_pattern_label":  # [b, head, dest, src]
            m = torch.zeros(b, prod.shape[-1], dtype=torch.bool, device=prod.device)
            m[rows[:, None], lab] = True
            by_src = prod.sum(2)  # [b, head, src]
            per_layer.append(to_host((by_src * m[:, None]).sum((0, 2))))
            per_pos.append(to_host(by_src.sum(0)))
        else:  # z / v: [b, pos, head, d]
            by_pos = prod.sum(-1)  # [b, pos, head]
            m = torch.zeros(b, by_pos.shape[1], dtype=torch.bool, device=prod.device)
            if kind == "head_out":
                m[:] = True
            elif kind == "head_out_readout":
                m[rows, q] = True
            else:
                m[rows[:, None], lab] = True
            per_layer.append(to_host((by_pos * m[..., None]).sum((0, 1))))
            per_pos.append(to_host(by_pos.sum(0).T))  # [head, pos]
    return per_layer, per_pos


def agreement(estimate: Tensor, exact: Tensor, k: int = 10, baseline: float = 0.0) -> dict[str, float]:
    """Spearman and Pearson correlation over all cells, and the overlap of the top-``k`` cells.

    Cells are ranked by the size of their effect ``|value - baseline|`` (``baseline`` is 0
    for denoising, 1 for noising). ``topk_overlap`` = shared cells / k.
    """
    e, x = estimate.reshape(-1).double().numpy(), exact.reshape(-1).double().numpy()
    k = min(k, e.size)
    top_e = set(np.argsort(-np.abs(e - baseline))[:k].tolist())
    top_x = set(np.argsort(-np.abs(x - baseline))[:k].tolist())
    return {
        "spearman": float(stats.spearmanr(e, x).statistic),
        "pearson": float(np.corrcoef(e, x)[0, 1]),
        "topk_overlap": len(top_e & top_x) / k,
        "k": float(k),
    }
