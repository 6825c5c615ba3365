"""The one re-run engine: keep the key/value cache of what an intervention cannot change, re-run only the rest.

An intervention at position ``p`` changes nothing before ``p`` (causal attention), so a re-run needs only the
positions from ``p`` on, attending to the cached keys and values of the positions before it. Three front-ends
use it, each a thin module over the functions here:

* ``stepper.ReadoutStepper``: the query readout slot, one appended token per intervention;
* ``slots.SlotStepper``: every readout slot ``k >= k_min``, one appended token per (intervention, slot);
* ``prefix_reuse.SuffixRunner``: every position from the first one where two runs differ, or from a patched
  position of one run (over that run's own cache).

What they share, written once here:

* **One padding rule** (``left_pad``): row ``r`` holds ``tokens[r, :last_r + 1]`` at the right end of
  ``width = max(last) + 1`` columns (left padding), with its attention mask and position ids, so that every
  row's last position sits in the last column.
* **One cache** (``prefix_cache``): a transformers ``DynamicCache`` filled by one forward (``NoKVPath`` with
  ``expected=True`` when the model has none, e.g. TL-native models); ``rerun`` appends tokens over a
  throwaway copy of it (``surgery.fresh_cache``), so re-runs never grow it.
* **One mask rule** (``rerun_mask``, ``copies_mask``): an appended token sees the keys its re-run may see; past
  a sliding window (Gemma-3-270M: 512 tokens) the cache keeps every position and the mask applies the window on
  sliding layers, a query at ``q`` seeing keys ``p`` with ``q - p < window`` (HF's rule).
* **One self-check** (``check_rerun``): a re-run without interventions must equal the full forward within
  ``max(atol, 2 eps(dtype)) x max(1, max |reference|)``: half precision rounds a one-token re-run differently
  from the full forward (measured 0.12 / 0.16 on logits of ~30 / ~24, SmolLM2 / Gemma in bfloat16), a broken
  cache errs by ``O(|logit|)``.
* **One fallback** (``kv_or_full``): ``mode="auto"`` takes the KV path when it builds and passes the check,
  else full forwards (quietly where the model has no cache, with a warning otherwise); ``"kv"`` raises instead;
  ``"full"`` never tries.
* **One chunking rule** (``layer_chunks``): interventions grouped into calls by the lowest layer they touch, so
  each call re-runs from its own (a screen listing every head re-ran heads of layer 12 from layer 0 before).
* **One intervention vocabulary** (``z_hooks``): head outputs (``hook_z``) replaced at a row's own slot, by zero,
  one vector per head, or a per-context (and per-slot) source.

The raw-torch plumbing (KV-cache shim, transient cache copies, windowed masks) is ``analysis.engine.surgery``'s.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechicl.analysis.engine.hooks import Hook, act_name, run_to_final
from mechicl.analysis.engine.surgery import (
    cache_kwargs,
    cache_shim,
    fresh_cache,
    new_kv_cache,
    sliding_window,
    windowed_mask,
)
from mechicl.models.device import model_dtype

MODES = ("auto", "kv", "full")
ATOL = 1e-3  # the self-check's absolute tolerance in float32 (relative to max(1, max |reference|))
# ``layer_chunks``: a call's fixed cost per block, in token rows (a modelling constant; it only decides where chunks
# are cut, never what they compute)
CALL_ROWS = 64
DP_STEPS = 10**6  # ``cheapest_runs``: cost evaluations before it falls back to plain runs (bounds its planning time)


class NoKVPath(RuntimeError):
    """The KV re-run cannot serve (no cache, nothing to reuse, or a failed self-check): use full forwards.

    ``expected``: True when that is the model's nature (TL-native, no cache), so no warning is due."""

    def __init__(self, msg: str, expected: bool = False) -> None:
        super().__init__(msg)
        self.expected = expected


def dims(model: Any) -> tuple[int, int]:
    """``(n_layers, n_heads)`` of the model: the names every front-end uses."""
    return int(model.cfg.n_layers), int(model.cfg.n_heads)


@dataclass(frozen=True)
class LeftPadded:
    """Row ``r`` holds ``tokens[r, :last_r + 1]`` at the right end of ``width`` columns (``offset[r]`` pad columns)."""

    tokens: Int[Tensor, "batch width"]
    mask: Int[Tensor, "batch width"]
    pos: Int[Tensor, "batch width"]  # position ids (0 on pad columns)
    offset: Int[Tensor, "batch"]

    @property
    def width(self) -> int:
        return int(self.tokens.shape[1])


def left_pad(tokens: Int[Tensor, "batch pos"], last: Int[Tensor, "batch"]) -> LeftPadded:
    """The one padding rule: every row's first ``last + 1`` tokens at the right end of ``max(last) + 1`` columns."""
    b, width = tokens.shape[0], int(last.max()) + 1
    tok, mask, pos = (torch.zeros(b, width, dtype=torch.long) for _ in range(3))
    for r in range(b):
        n = int(last[r]) + 1
        tok[r, width - n :] = tokens[r, :n]
        mask[r, width - n :] = 1
        pos[r, width - n :] = torch.arange(n)
    return LeftPadded(tok, mask, pos, width - (last + 1))


def length_chunks(last: Int[Tensor, "batch"], tokens: int) -> list[Int[Tensor, "rows"]]:
    """Rows grouped for chunked prefix forwards: sorted by length (``last + 1``), each group at most ``tokens``
    tokens at its own width (one row at least), so short rows are not padded to the longest. Why: one forward
    of 32 Gemma-3 contexts x 558 tokens took 2.4 s a context, one context at a time 1.6 s (activations that
    fit the CPU's caches; ``docs/findings.md``, "Cost")."""
    order = torch.argsort(last, stable=True)
    groups: list[list[int]] = [[]]
    for r in order.tolist():
        width = int(last[r]) + 1  # the group's width once r joins it (sorted: r is its longest row)
        if groups[-1] and (len(groups[-1]) + 1) * width > tokens:
            groups.append([])
        groups[-1].append(r)
    return [torch.tensor(g, dtype=torch.long) for g in groups]


@torch.no_grad()
def prefix_cache(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    hooks: Sequence[Hook] = (),
    *,
    keep_all: bool = True,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> tuple[Any, Tensor]:
    """One forward of ``tokens`` (with ``hooks``) that fills a new KV cache; returns ``(cache, resid)``, ``resid``
    the residual entering the final norm. ``keep_all``: every layer keeps every position
    (``surgery.new_kv_cache``). Raises ``NoKVPath`` when the model has no cache or the cache missed positions.
    Cost: one forward; memory: ``batch x pos x n_layers x 2 x n_kv_heads x d_head`` floats."""
    cache = new_kv_cache(model, keep_all=keep_all)
    if cache is None:
        raise NoKVPath("the model has no transformers KV cache", expected=True)
    kw = {k: v for k, v in (("attention_mask", attention_mask), ("position_ids", position_ids)) if v is not None}
    with cache_shim(model):
        resid = run_to_final(model, tokens, hooks, **kw, **cache_kwargs(model, cache))
    if cache.get_seq_length() != tokens.shape[1]:
        raise NoKVPath(f"the KV cache holds {cache.get_seq_length()} positions, expected {tokens.shape[1]}")
    return cache, resid


def rerun(
    model: Any,
    cache: Any,
    tokens: Int[Tensor, "rows new"],
    hooks: Sequence[Hook],
    *,
    attention_mask: Tensor | dict[str, Tensor],
    position_ids: Int[Tensor, "rows new"],
    start: tuple[int, Tensor] | None = None,
    repeats: int = 1,
    keep: int | None = None,
) -> Tensor:
    """The residual entering the final norm at ``tokens`` appended to ``cache`` (``repeats`` copies of its batch,
    row ``copy * batch + context``; only its first ``keep`` positions when given), optionally from block
    ``start[0]`` on. The cache is not changed.
    Cost: ``rows x new`` tokens through the blocks run, each attending to the cached positions."""
    with cache_shim(model):
        return run_to_final(
            model,
            tokens,
            hooks,
            attention_mask=attention_mask,
            start=start,
            position_ids=position_ids,
            **cache_kwargs(model, fresh_cache(cache, repeats, keep)),
        )


def rerun_mask(
    model: Any,
    visible: Bool[Tensor, "batch rows keys"],
    q_pos: Int[Tensor, "batch rows"],
    k_pos: Int[Tensor, "batch keys"],
) -> Tensor | dict[str, Tensor]:
    """The 4D ``attention_mask`` of re-run rows: ``visible`` (which cached and appended keys each row sees), and on
    sliding-window layers only keys with ``q_pos - k_pos < window`` once the positions pass the window (per layer
    type where the config names them, ``surgery.windowed_mask``). Cost: two mask copies."""
    m4, window = visible[:, None], sliding_window(model)
    if not window or int(q_pos.max()) + 1 <= window:
        return m4
    near = (q_pos[:, :, None] - k_pos[:, None, :]) < window
    return windowed_mask(model, m4, near[:, None])


def copies_mask(
    model: Any,
    prefix_ok: Bool[Tensor, "batch rows cached"],
    q_pos: Int[Tensor, "batch rows"],
    k_pos: Int[Tensor, "batch cached"],
) -> Tensor | dict[str, Tensor]:
    """``rerun_mask`` of independent one-token re-runs appended side by side: row ``i`` sees the cached keys
    ``prefix_ok[:, i]`` and itself only (not the other appended copies)."""
    b, n, c = prefix_ok.shape
    visible = torch.zeros(b, n, c + n, dtype=torch.bool)
    visible[:, :, :c] = prefix_ok
    visible[:, torch.arange(n), c + torch.arange(n)] = True
    return rerun_mask(model, visible, q_pos, torch.cat([k_pos, q_pos], 1))


def check_rerun(what: str, got: Tensor, want: Tensor, model: Any, atol: float = ATOL) -> None:
    """The one self-check: ``NoKVPath`` unless ``|got - want| <= max(atol, 2 eps(dtype)) x max(1, max |want|)``."""
    err = float((got - want).abs().max())
    tol = max(atol, 2 * torch.finfo(model_dtype(model)).eps)
    if not err <= tol * max(1.0, float(want.abs().max())):
        raise NoKVPath(f"{what} differs from the full forward by {err:.3g}")


def kv_or_full(owner: str, mode: str, build_kv: Callable[[], Any]) -> bool:
    """The one fallback path: whether ``build_kv()`` (the KV path's construction and self-check) succeeded.

    ``mode="full"``: never tried. ``"auto"``: a failure means full forwards, with a warning unless it is the
    model's nature (``NoKVPath(expected=True)``). ``"kv"``: a failure raises."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "full":
        return False
    try:
        build_kv()
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: use full forwards
        if mode == "kv":
            raise
        if not (isinstance(e, NoKVPath) and e.expected):
            warnings.warn(f"{owner}: KV path unavailable ({type(e).__name__}: {e}); using full forwards", stacklevel=3)
        return False


def lowest_layer(masks: Bool[Tensor, "n layer head"]) -> int:
    """The lowest layer any intervention touches (the last layer when none does): blocks below it are unchanged."""
    used = masks.any(0).any(-1).nonzero()[:, 0]
    return int(used.min()) if len(used) else masks.shape[1] - 1


def cheapest_runs(n: int, per: int, cost: Callable[[int, int], float]) -> list[tuple[int, int]]:
    """Cut items ``0 .. n-1`` (already sorted) into consecutive runs ``(start, stop)`` of at most ``per`` items that
    minimise ``sum(cost(start, stop - start))``: a dynamic programme over the cut points, exact. The one grouping rule
    of the engine's front-ends (``layer_chunks``; ``prefix_reuse.suffix_groups``). Cost: ``n x per`` calls of
    ``cost``; past ``DP_STEPS`` of them, plain runs of ``per`` in the sorted order (what a sort alone saves)."""
    per = max(1, per)
    if n * min(n, per) > DP_STEPS:
        return [(a, min(n, a + per)) for a in range(0, n, per)]
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(max(0, i - per), i):
            c = best[j] + cost(j, i - j)
            if c < best[i]:
                best[i], cut[i] = c, j
    runs, i = [], n
    while i > 0:
        runs.append((cut[i], i))
        i = cut[i]
    return runs[::-1]


def layer_chunks(
    masks: Bool[Tensor, "n layer head"], per: int, rows: int = 1, call_rows: int = CALL_ROWS
) -> list[Int[Tensor, "m"]]:
    """The interventions in chunks of at most ``per``, grouped by the lowest layer each touches, so that every chunk
    re-runs from its own lowest layer (``lowest_layer``) and not from the lowest of whatever slice it was given.

    Why: a screen lists every head layer by layer; cut in slices of ``per``, a slice holding heads of layers 0-12
    re-ran 13 layers for each of them. Here the interventions are sorted by their lowest layer and cut
    (``cheapest_runs``) where the work is least: a chunk starting at layer ``l`` costs ``(its interventions x rows +
    call_rows) x (L - l)`` token rows through blocks (``rows`` = token rows per intervention; ``call_rows`` = what a
    call's fixed cost per block, hooks and smaller matrix products, is taken to be worth). Returns index tensors
    into ``masks`` that together hold each index once. Cost: ``n x per`` steps, no forwards."""
    n, L = masks.shape[0], masks.shape[1]
    touched = masks.any(-1)  # [n, L]
    low = torch.where(touched.any(-1), touched.to(torch.int8).argmax(-1), torch.full((n,), L - 1))
    order = torch.argsort(low, stable=True)
    depth = (L - low[order]).tolist()  # blocks re-run by a chunk that starts at this intervention
    runs = cheapest_runs(n, per, lambda j, size: (size * rows + call_rows) * depth[j])
    return [order[a:b] for a, b in runs]


def in_order(parts: Sequence[tuple[Tensor, Tensor]], n: int) -> Tensor:
    """``(indices, results)`` of chunks (``layer_chunks``) back in the interventions' order: ``[n, ...]``, on the
    results' device (the first chunk's shape after dim 0)."""
    out = parts[0][1].new_empty(n, *parts[0][1].shape[1:])
    for idx, part in parts:
        out[idx.to(out.device)] = part
    return out


def z_hooks(
    masks: Bool[Tensor, "n layer head"],
    source: Tensor | None,
    n_slots: int,
    b: int,
    rows_pos: Int[Tensor, "rows"] | None = None,
) -> list[tuple[str, Callable]]:
    """``hook_z`` hooks replacing, in intervention ``i``, the heads ``masks[i]`` at each row's own slot.

    ``source``: ``None`` (zero), ``[layer, head, d_head]`` (one vector per head) or ``[batch, slot, layer, head,
    d_head]`` (per context and slot). Rows are ``(context, intervention, slot)`` in that order: appended copies
    ``act [b, n x slots, head, d]`` (``rows_pos=None``), or full forwards ``act [b x n x slots, pos, head, d]``
    edited at ``rows_pos`` (each row's slot position)."""
    n, S = masks.shape[0], n_slots
    hooks = []
    for l in range(masks.shape[1]):
        m_l = masks[:, l]  # [n, head]
        if not m_l.any():
            continue
        src = None if source is None else source[l][None, None, None] if source.dim() == 3 else source[:, :, l][:, None]

        def hook(act: Tensor, hook: Any, m_l: Tensor = m_l, src: Tensor | None = src) -> Tensor:
            m_l = m_l.to(act.device)  # masks and sources live on the host; meet the activation on its device
            src = None if src is None else src.to(act.device, act.dtype)
            keep = m_l[None, :, None, :, None]  # [1, n, 1, head, 1]
            if rows_pos is None:  # appended copies: act [b, n * S, head, d]
                a = act.reshape(b, n, S, *act.shape[2:])
                repl = torch.zeros_like(a) if src is None else src.expand_as(a)
                return torch.where(keep, repl, a).reshape(act.shape)
            act = act.clone()  # full forwards: edit each row's own slot
            r, rp = torch.arange(act.shape[0], device=act.device), rows_pos.to(act.device)
            at = act[r, rp].reshape(b, n, S, *act.shape[2:])
            repl = torch.zeros_like(at) if src is None else src.expand_as(at)
            act[r, rp] = torch.where(keep, repl, at).reshape(-1, *act.shape[2:])
            return act

        hooks.append((act_name("z", l), hook))
    return hooks
