"""Attention saliency (Wang et al., *Label Words are Anchors*) at readout slots.

I_l = |sum_h A_{h,l} * dL/dA_{h,l}|, with gradients taken through ``blocks.{l}.attn.hook_pattern``
(captured with ``hooks.capture(grad=True)``; no model code is patched). L is the cross-entropy of
the *shown* label over the label set at the query slot(s). Per layer: S_wp (text -> label tokens),
S_pq (label tokens -> query), S_ww (all other pairs), each a mean over its pairs (i <- j, j < i).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.analysis.engine.hooks import act_name, at_slots, capture, grad_leaf, run_to_final, to_host
from mechicl.analysis.engine.readout import unembed_labels
from mechicl.analysis.inside.frames import heads_frame
from mechicl.data.prompts import PromptBatch


def _query_index(batch: PromptBatch, queries: str, k_min: int) -> Int[Tensor, "q"]:
    if queries == "last":
        return torch.tensor([batch.n_examples - 1])
    if queries == "all":
        return torch.arange(k_min, batch.n_examples)
    raise ValueError(f"queries must be 'last' or 'all', got {queries!r}")


def saliency_maps(
    model: Any, batch: PromptBatch, queries: str = "last", k_min: int = 1
) -> Float[Tensor, "batch layer head query key"]:
    """|A_h * dL/dA_h| for every head (one forward + backward over ``batch``; call on small sub-batches).

    Summing A * dL/dA over heads *before* the absolute value gives Wang et al.'s per-layer I_l.
    Returned as the signed product; take ``.abs()`` per head or after summing heads.
    """
    store: dict[str, Tensor] = {}
    qi = _query_index(batch, queries, k_min)
    names = [act_name("pattern", l) for l in range(model.cfg.n_layers)]
    hooks = [("hook_embed", grad_leaf), *capture(names, store, grad=True)]
    with torch.enable_grad():
        resid = run_to_final(model, batch.tokens, hooks, attention_mask=batch.attention_mask)
        at = at_slots(resid, batch.readout_pos[:, qi])  # [b, q, d_model]
        logits = unembed_labels(model, at, batch.label_token_ids)  # [b, q, n_labels]
        target = batch.shown_labels[:, qi].to(logits.device)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        pats = [store[n] for n in names]
        grads = torch.autograd.grad(loss, pats)
    return torch.stack([to_host(p.float() * g.float()) for p, g in zip(pats, grads)], dim=1)


def saliency_pair_masks(
    batch: PromptBatch, queries: str = "last", k_min: int = 1
) -> dict[str, Float[Tensor, "batch query_pos key_pos"]]:
    """Masks of Wang et al.'s pair sets over (i <- j): ``wp`` (label token <- earlier token),
    ``pq`` (query slot <- earlier label token), ``ww`` (every other j < i up to the last query)."""
    n, w = batch.tokens.shape
    qi = _query_index(batch, queries, k_min)
    rows = torch.arange(n)[:, None]
    pq = torch.zeros(n, w, w)
    wp = torch.zeros(n, w, w)
    last = int(qi.max())
    for i in qi.tolist():
        pq[rows, batch.readout_pos[:, i : i + 1], batch.label_pos[:, :i]] = 1.0
    lab = batch.label_pos[:, :last]  # label tokens that precede the last query
    lower = torch.tril(torch.ones(w, w), diagonal=-1)
    wp[rows, lab] = lower[lab]
    upto = (torch.arange(w)[None, :, None] <= batch.readout_pos[:, last, None, None]).float()
    ww = lower[None] * upto * (1 - pq) * (1 - wp)
    return {"wp": wp, "pq": pq, "ww": ww}


@dataclass(frozen=True)
class Saliency:
    """``layers``: condition, layer, S_wp, S_pq, S_ww (means over pairs, then over contexts) and their
    shares of S_wp + S_pq + S_ww. ``heads``: condition, layer, head, saliency (mean |A_h dL/dA_h| over
    the pq pairs: how much each head's attention onto label tokens matters for the loss).
    Cost: one forward + backward per context; memory: a sub-batch's attention tensors and their gradients."""

    layers: pd.DataFrame = field(repr=False)
    heads: pd.DataFrame = field(repr=False)


def attention_saliency(
    model: Any,
    batches: Sequence[PromptBatch],
    queries: str = "last",
    k_min: int = 1,
    batch_size: int = 1,
    progress: bool = True,
) -> Saliency:
    """S_wp, S_pq, S_ww per layer and each head's pq saliency, averaged over the contexts of each batch.

    ``batch_size``: contexts per forward + backward. The backward keeps every layer's attention tensors; one
    context at a time is no slower on the embedded models and bounds the memory (vader-words, 16 examples, one
    thread, 8 contexts: smollm2-135m 9.5 s and +0.50 GB over the loaded model at 1, 13.3 s and +2.05 GB at 4;
    gemma3-270m 7.5 s, +0.31 GB at 1 and 8.8 s, +1.19 GB at 4; ``benchmarks/bench_saliency_memory.py``,
    docs/results/memory/saliency_batch.md; issue 31).
    """
    layer_rows, head_rows = [], []
    for batch in batches:
        per_ctx_layer, per_ctx_head = [], []
        chunks = range(0, batch.n_contexts, batch_size)
        for start in tqdm(chunks, desc=f"saliency {batch.condition}", unit="batch", disable=not progress, leave=False):
            sub = batch.select(slice(start, start + batch_size))
            prod = saliency_maps(model, sub, queries, k_min)  # [b, L, H, W, W]
            masks = saliency_pair_masks(sub, queries, k_min)
            i_layer = prod.sum(2).abs()  # [b, L, W, W]
            s = {k: (i_layer * m[:, None]).sum((-1, -2)) / m.sum((-1, -2))[:, None] for k, m in masks.items()}
            per_ctx_layer.append(torch.stack([s["wp"], s["pq"], s["ww"]], -1))  # [b, L, 3]
            pq = masks["pq"][:, None, None]
            per_ctx_head.append((prod.abs() * pq).sum((-1, -2)) / pq.sum((-1, -2)))  # [b, L, H]
        lay = torch.cat(per_ctx_layer).mean(0).numpy()  # [L, 3]
        tot = lay.sum(-1, keepdims=True)
        layer_rows.append(
            pd.DataFrame(
                {
                    "condition": batch.condition,
                    "layer": np.arange(lay.shape[0]),
                    "S_wp": lay[:, 0],
                    "S_pq": lay[:, 1],
                    "S_ww": lay[:, 2],
                    "share_wp": lay[:, 0] / tot[:, 0],
                    "share_pq": lay[:, 1] / tot[:, 0],
                    "share_ww": lay[:, 2] / tot[:, 0],
                }
            )
        )
        hd = torch.cat(per_ctx_head).mean(0).numpy()
        head_rows.append(heads_frame(hd, condition=batch.condition, saliency=hd.ravel()))
    return Saliency(pd.concat(layer_rows, ignore_index=True), pd.concat(head_rows, ignore_index=True))
