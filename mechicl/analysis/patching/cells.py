"""How a patching cell is written and read: the setters of the sweep kinds (``patching.kinds``, in the style of
TransformerLens's ``patching.py`` setters) and the one metric read-out, the logit difference at the query slot
from residuals (``readout_ld``), shared by exact, label-position and path patching."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechicl.analysis.engine.hooks import to_host
from mechicl.analysis.engine.readout import unembed_labels
from mechicl.analysis.patching.kinds import SweepKind
from mechicl.data.pairs import PatchPair


def n_index(model: Any, kind: SweepKind, width: int) -> int:
    """Cells per layer: positions (``width``), KV heads, or heads."""
    cfg = model.cfg
    if kind.axes[1] == "pos":
        return width
    if kind.axes[1] == "kv_head":
        return int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    return int(cfg.n_heads)


def setter(kind: SweepKind, pair: PatchPair) -> Callable[[Tensor, Tensor, int], None]:
    """``set(receiver_act, donor_act, index)`` writes one cell in place; acts are ``[batch, ...]``."""
    rows = torch.arange(pair.n_contexts)[:, None]
    lab = pair.clean.label_pos[:, :-1]  # in-context (demonstration) label positions
    if kind.axes[1] == "pos":

        def s(a: Tensor, d: Tensor, i: int) -> None:
            a[:, i] = d[:, i]
    elif kind.name == "head_out":

        def s(a: Tensor, d: Tensor, i: int) -> None:
            a[:, :, i] = d[:, :, i]
    elif kind.name in ("head_out_label", "head_v_label"):  # index tensors meet the activations on their device

        def s(a: Tensor, d: Tensor, i: int) -> None:
            a[rows.to(a.device), lab.to(a.device), i] = d[rows.to(a.device), lab.to(a.device), i]
    elif kind.name == "head_pattern_label":

        def s(a: Tensor, d: Tensor, i: int) -> None:  # [batch, head, dest, src]: columns of label sources
            a[rows.to(a.device), i, :, lab.to(a.device)] = d[rows.to(a.device), i, :, lab.to(a.device)]
    else:
        raise ValueError(f"no full-sequence setter for {kind.name}")
    return s


def readout_ld(
    model: Any,
    pair: PatchPair,
    resid: Float[Tensor, "rows pos d_model"],
    offset: int = 0,
    before: Float[Tensor, "batch"] | None = None,
) -> Float[Tensor, "n batch"]:
    """Per-context LD at the query slot from final residuals of ``n`` stacked copies of the pair's batch
    (rows ``copy * batch + context``; position 0 of ``resid`` is position ``offset`` of the context).
    A context whose query slot lies before ``offset`` (a re-run from a later position cannot change it) gets
    ``before[context]``, the receiver's own LD; it is an error to leave ``before`` out then."""
    b = pair.n_contexts
    n = resid.shape[0] // b
    rows = torch.arange(resid.shape[0])
    q = pair.query_pos.repeat(n) - offset
    logits = to_host(unembed_labels(model, resid[rows, q.clamp(min=0)], pair.clean.label_token_ids))
    ld = pair.logit_diff(logits.view(n, b, -1))
    early = pair.query_pos < offset
    if early.any():
        if before is None:
            raise ValueError(f"contexts {early.nonzero()[:, 0].tolist()} end before position {offset}")
        ld[:, early] = before[early]
    return ld
