"""One hook vocabulary: TransformerLens hook names, capture hooks, the stop-at-final-norm run, head masks.

Every intervention in mechicl is a TransformerLens forward hook ``(name, fn)`` passed to
``model.run_with_hooks`` (the contract of TL's ``hook_points.py``: ``fn(activation, hook)``
returns a replacement or ``None``). Names come from TL's own ``get_act_name``. This module adds:

* ``capture``: the one factory for hooks that keep activations (optionally gathered at positions);
* ``run_to_final``: a forward that stops at the final norm's input, the extension TL lacks (the
  bridge's ``stop_at_layer`` can only stop at a block's ``hook_in``, so the 262k-word Gemma
  unembedding, 54% of a 300-token forward, would always run); optionally starting at a later block
  (``start``), which TL's ``start_at_layer`` accepts but does not make cheaper;
* ``head_masks``: boolean (layer, head) masks of head sets.

The only code that touches torch modules directly (a replaced block ``forward``, a KV-cache
shim) is in ``analysis.engine.surgery``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from mechicl.analysis.engine.surgery import start_at
from mechicl.data.names import head_name
from mechicl.models.device import input_device

Hook = tuple[str, Callable[..., Any]]
Head = tuple[int, int]
FINAL = "ln_final.hook_in"  # the residual stream entering the final norm


def act_name(kind: str, layer: int) -> str:
    """TL's hook name, e.g. ``act_name("z", 3) == "blocks.3.attn.hook_z"`` (``transformer_lens.utilities.get_act_name``)."""
    return get_act_name(kind, layer)


def at_slots(x: Tensor, pos: Int[Tensor, "batch slot"]) -> Tensor:
    """``x[b, pos[b, s], ...]`` for activations ``[batch, pos, ...]`` -> ``[batch, slot, ...]`` (on ``x``'s device)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], pos.to(x.device)]


def to_host(x: Tensor) -> Tensor:
    """A result leaving an analysis: detached, float32, on the CPU (a no-op for CPU float32 tensors)."""
    return x.detach().float().cpu()


def on_device(model: Any, x: Any) -> Any:
    """``x`` (a tensor, or a dict of them such as per-layer-type masks; anything else is returned as is) on the
    device the model's inputs go to."""
    if isinstance(x, dict):
        return {k: on_device(model, v) for k, v in x.items()}
    return x.to(input_device(model)) if isinstance(x, Tensor) else x


def _query_axis(name: str) -> int:
    """The position axis that ``capture(at=...)`` gathers: the query axis of ``[b, head, q, k]`` patterns."""
    return 2 if name.endswith(("hook_pattern", "hook_attn_scores")) else 1


def capture(
    names: Sequence[str], store: dict[str, Tensor], at: Int[Tensor, "batch slot"] | None = None, grad: bool = False
) -> list[Hook]:
    """Hooks that keep the activation of each hook in ``names`` in ``store[name]``.

    ``at``: gather these positions per context (``[batch, slot]``; the query axis of attention
    patterns, the position axis otherwise) instead of keeping the whole tensor. Kept tensors are
    detached copies, safe against later in-place edits. ``grad=True`` keeps a differentiable copy
    instead and makes it the tensor used downstream, so ``torch.autograd.grad(loss, store[name])``
    works for any hook (TL hands some hooks, e.g. ``hook_z``, a reshaped view).
    """

    def make(name: str) -> Callable[[Tensor, Any], Tensor | None]:
        def keep(x: Tensor, hook: Any) -> Tensor | None:
            if grad:
                store[name] = y = x.clone()
                return y
            if at is None:
                store[name] = x.detach().clone()
            elif _query_axis(name) == 2:
                rows = torch.arange(x.shape[0], device=x.device)[:, None]
                store[name] = x[rows, :, at.to(x.device)].detach()  # [b, slot, head, key]
            else:
                store[name] = at_slots(x, at).detach()
            return None

        return keep

    return [(n, make(n)) for n in dict.fromkeys(names)]


def grad_leaf(x: Tensor, hook: Any) -> Tensor:
    """A hook that makes its activation a leaf requiring grad (a backward needs one input that does)."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


class _Stop(Exception):
    """Raised by the stop hook to end a forward early; only ``run_to_final`` raises and catches it."""


def run_to_final(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    hooks: Sequence[Hook] = (),
    *,
    stop: str = FINAL,
    start: tuple[int, Tensor] | None = None,
    **forward_kwargs: Any,
) -> Float[Tensor, "batch pos d_model"]:
    """Run ``model`` (a TransformerBridge) with ``hooks``; stop once hook ``stop`` fires and return its activation.

    With the default ``stop`` that is the residual entering the final norm and the unembedding
    never runs. ``start=(l, resid)`` starts at block ``l`` from the residual ``resid`` entering it:
    blocks ``0..l-1`` do not run (``surgery.start_at``). Cost: blocks ``l..`` up to ``stop``.
    Raises if ``stop`` never fires. ``tokens`` and tensor keyword arguments (masks, position ids) are
    moved to the model's input device here, the one place every analysis forward passes through
    (a ``start`` residual only when it is on another kind of device: a split model keeps it where it is).
    """
    out: dict[str, Tensor] = {}
    dev = input_device(model)
    tokens = tokens.to(dev)
    forward_kwargs = {k: on_device(model, v) for k, v in forward_kwargs.items()}
    if start is not None and start[1] is not None and start[1].device.type != dev.type:
        start = (start[0], start[1].to(dev))

    def halt(x: Tensor, hook: Any) -> None:
        out["x"] = x
        raise _Stop

    ctx = start_at(model, *start) if start is not None else contextlib.nullcontext()
    with ctx:
        try:
            model.run_with_hooks(tokens, fwd_hooks=[*hooks, (stop, halt)], **forward_kwargs)
        except _Stop:
            pass
    if "x" not in out:
        raise RuntimeError(f"hook {stop!r} never fired; the model lacks it (mechicl needs a final-norm hook)")
    return out["x"]


def head_masks(sets: Sequence[Sequence[Head]], n_layers: int, n_heads: int) -> Bool[Tensor, "n layer head"]:
    """One boolean (layer, head) mask per head set."""
    m = torch.zeros(len(sets), n_layers, n_heads, dtype=torch.bool)
    for i, s in enumerate(sets):
        for l, h in s:
            m[i, l, h] = True
    return m


def fmt_heads(heads: Sequence[Head]) -> str:
    """``L{layer}H{head}`` names, space-separated."""
    return " ".join(head_name(l, h) for l, h in heads)
