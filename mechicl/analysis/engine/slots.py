"""``SlotStepper``: re-run every readout slot with ``k >= k_min`` of every context, with head-output
interventions at that slot only.

``ReadoutStepper`` re-runs one slot per context (the query). Findings need more data per context:
a context with examples ``0..K`` has a readout slot for every ``k`` (the prediction of example
``k``'s label after ``k`` labelled examples), and each is a measurement. An intervention at slot
``s`` changes nothing before it, so every slot's re-run can share one key/value cache of the whole
context: the re-run copy of slot ``s`` sees the cached positions before ``s`` and itself only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.analysis.engine.hooks import act_name, capture, run_to_final
from mechicl.analysis.engine.readout import unembed_labels
from mechicl.analysis.engine.surgery import (
    cache_kwargs,
    cache_shim,
    fresh_cache,
    new_kv_cache,
    sliding_window,
    windowed_mask,
)
from mechicl.data.prompts import PromptBatch


class _NoCache(RuntimeError):
    """The model has no transformers KV cache (e.g. a TL-native model): full forwards, no warning."""


def _left_pad(batch: PromptBatch, P: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Tokens, mask, position ids of every context's first ``q_last + 1`` tokens at the right end of
    ``P`` columns, and each row's column offset."""
    b = batch.n_contexts
    q = batch.readout_pos[:, -1]
    tok, mask, pos = (torch.zeros(b, P, dtype=torch.long) for _ in range(3))
    off = P - (q + 1)
    for r in range(b):
        n = int(q[r]) + 1
        tok[r, P - n :] = batch.tokens[r, :n]
        mask[r, P - n :] = 1
        pos[r, P - n :] = torch.arange(n)
    return tok, mask, pos, off


class SlotStepper:
    """Label logits at every readout slot ``k >= k_min`` under head-output interventions at that slot.

    ``slots``: example indices ``k_min .. n_examples - 1`` (slot ``s`` has seen ``k_min + s`` labelled
    examples). On construction the whole context runs once, keeping its key/value cache and every
    head's output (``hook_z``) at each slot. ``run`` appends ``n x S`` tokens per context (``n``
    interventions x ``S`` slots); a 4D mask lets copy ``(i, s)`` see the cache before slot ``s`` and
    itself, at slot ``s``'s position id: exact, independent re-runs (checked on construction against
    the full forward). Models without a usable KV cache fall back to one full forward per
    (intervention, slot) row (``mode == "full"``).

    Cost: construction 1 forward; ``run``: ``n x S`` one-token steps per context from the lowest
    intervened layer on (kv; blocks below it are skipped: their output is the cached residual) or
    ``n x S`` forwards per context (full). Memory: the KV cache of the batch plus ``z`` at the slots,
    ``batch x S x n_layers x n_heads x d_head`` floats; a step's attention scores stay under
    ``score_bytes`` (the chunking of ``run``).
    """

    def __init__(
        self,
        model: Any,
        batch: PromptBatch,
        k_min: int,
        *,
        step_tokens: int = 8192,
        max_rows: int = 64,
        score_bytes: int = 2**26,
        mode: str = "auto",
        atol: float = 1e-3,
    ) -> None:
        if not 0 <= k_min < batch.n_examples:
            raise ValueError(
                f"k_min={k_min} must be in [0, {batch.n_examples - 1}] for {batch.n_examples}-example contexts"
            )
        self.model, self.batch, self.k_min = model, batch, k_min
        self.step_tokens, self.max_rows, self.score_bytes = step_tokens, max_rows, score_bytes
        self.pos = batch.readout_pos[:, k_min:]  # [b, S] readout positions of the slots
        self.label_ids = batch.label_token_ids
        self.L, self.H = int(model.cfg.n_layers), int(model.cfg.n_heads)
        self._window = sliding_window(model)
        self.P = int(batch.readout_pos[:, -1].max()) + 1
        self.mode, self._cache = "full", None
        if mode in ("auto", "kv"):
            try:
                self._init_kv(atol)
                return
            except Exception as e:  # noqa: BLE001 - any failure means: use full forwards
                if mode == "kv":
                    raise
                if not isinstance(e, _NoCache):  # TL-native models have none: full forwards are expected there
                    warnings.warn(
                        f"SlotStepper: KV-cache path unavailable ({type(e).__name__}: {e}); using full forwards",
                        stacklevel=2,
                    )
        self._init_full()

    @property
    def n_slots(self) -> int:
        return int(self.pos.shape[1])

    @property
    def true_labels(self) -> Int[Tensor, "batch slot"]:
        return self.batch.true_labels[:, self.k_min :]

    def _z_names(self) -> list[str]:
        return [act_name("z", l) for l in range(self.L)]

    @torch.no_grad()
    def _init_kv(self, atol: float) -> None:
        cache = new_kv_cache(self.model, keep_all=True)  # appended steps must not evict the prefix
        if cache is None:
            raise _NoCache("the model has no transformers KV cache")
        tok, mask, pos, off = self._prefix = _left_pad(self.batch, self.P)
        self._cols = self.pos + off[:, None]  # [b, S] slot columns in the left-padded layout
        store: dict[str, Tensor] = {}
        res_names = [act_name("resid_pre", l) for l in range(1, self.L)]
        with cache_shim(self.model):
            resid = run_to_final(
                self.model,
                tok,
                capture(self._z_names() + res_names, store, at=self._cols),
                attention_mask=mask,
                position_ids=pos,
                **cache_kwargs(self.model, cache),
            )
        self._cache = cache
        self.z = torch.stack([store[n] for n in self._z_names()], 2)  # [b, S, L, H, d]
        self._resid_pre = {
            l: store[act_name("resid_pre", l)] for l in range(1, self.L)
        }  # [b, S, d]: re-runs start there
        rows = torch.arange(tok.shape[0])[:, None]
        self.base_logits = unembed_labels(self.model, resid[rows, self._cols], self.label_ids)  # [b, S, labels]
        self.mode = "kv"
        check = self.run(torch.zeros(2, self.L, self.H, dtype=torch.bool))
        err = float((check - self.base_logits[None]).abs().max())
        if not err <= atol * max(1.0, float(self.base_logits.abs().max())):
            self.mode = "full"
            raise RuntimeError(f"KV re-run differs from the full forward by {err:.3g}")

    @torch.no_grad()
    def _init_full(self) -> None:
        store: dict[str, Tensor] = {}
        resid = run_to_final(self.model, self.batch.tokens[:, : self.P], capture(self._z_names(), store, at=self.pos))
        self.z = torch.stack([store[n] for n in self._z_names()], 2)
        rows = torch.arange(self.batch.n_contexts)[:, None]
        self.base_logits = unembed_labels(self.model, resid[rows, self.pos], self.label_ids)
        self.mode = "full"

    @torch.no_grad()
    def run(
        self, masks: Bool[Tensor, "n layer head"], source: Float[Tensor, "..."] | None = None, progress: bool = False
    ) -> Float[Tensor, "n batch slot n_labels"]:
        """Label logits at every slot for ``n`` interventions.

        Intervention ``i`` replaces the slot output of every head with ``masks[i, layer, head]`` by
        ``source`` (``None``: zero; ``[batch, slot, layer, head, d_head]``: per context and slot,
        e.g. a donor context's output at the same slot; ``[layer, head, d_head]``: one vector).
        """
        n, S = masks.shape[0], self.n_slots
        if self.mode == "kv":
            per = self._kv_chunk(n)
        else:  # full: each chunk runs its contexts in groups of at most max_rows rows
            per = max(1, self.max_rows // S)
        chunks = range(0, n, per)
        out = [
            self._chunk(masks[c : c + per], source)
            for c in tqdm(chunks, desc="slot interventions", unit="chunk", disable=not progress, leave=False)
        ]
        return torch.cat(out, 0) if out else torch.zeros(0, self.batch.n_contexts, S, len(self.label_ids))

    def _kv_chunk(self, n: int) -> int:
        """Interventions per step: at most ``step_tokens`` appended tokens, and attention scores
        (``batch x heads x n*S x (P + n*S)`` floats) under ``score_bytes``."""
        b, S = self.batch.n_contexts, self.n_slots
        per = max(1, min(n, self.step_tokens // max(1, b * S)))
        while per > 1 and 4 * b * self.H * per * S * (self.P + per * S) > self.score_bytes:
            per = (per + 1) // 2
        return per

    def attribution(
        self, source: Float[Tensor, "batch slot layer head d_head"] | None, metric: Callable[[Tensor, Tensor], Tensor]
    ) -> Float[Tensor, "batch slot layer head"]:
        """First-order estimate of each head's replacement effect at each slot on ``metric``.

        ``metric(logits [b, S, labels], true_labels [b, S]) -> [b, S]`` (e.g. P(true label)). Estimate:
        ``(source - z) . d metric(slot) / d z(slot)``, the gradient taken at the re-run copy of each slot,
        so it holds the slot's own effect only (attribution patching, Nanda 2023). Cost: ``S`` tokens per
        context forward and backward (kv) or ``S`` forwards and backwards per context (full).
        """
        S, b = self.n_slots, self.batch.n_contexts
        store: dict[str, Tensor] = {}
        hooks = capture(self._z_names(), store, grad=True)
        with torch.enable_grad():
            if self.mode == "kv":
                tok, mask, pos, _ = self._prefix
                with cache_shim(self.model):
                    resid = run_to_final(
                        self.model,
                        tok.gather(1, self._cols),
                        hooks,
                        attention_mask=self._step_mask(self._cols),
                        position_ids=pos.gather(1, self._cols),
                        **cache_kwargs(self.model, fresh_cache(self._cache)),
                    )
                logits = unembed_labels(self.model, resid, self.label_ids)  # [b, S, labels]
                at = lambda x: x  # noqa: E731 - copies are already [b, S, ...]
            else:
                rows_pos = self.pos.reshape(-1)
                resid = run_to_final(self.model, self.batch.tokens[:, : self.P].repeat_interleave(S, 0), hooks)
                logits = unembed_labels(self.model, resid[torch.arange(b * S), rows_pos], self.label_ids).view(b, S, -1)
                at = lambda x: x[torch.arange(b * S), rows_pos].view(b, S, *x.shape[2:])  # noqa: E731
            zs = [store[n] for n in self._z_names()]
            grads = torch.autograd.grad(metric(logits, self.true_labels).sum(), zs)
        g = torch.stack([at(x) for x in grads], 2)  # [b, S, L, H, d]
        src = torch.zeros_like(self.z) if source is None else source.expand_as(self.z)
        return ((src - self.z) * g).sum(-1)

    def _step_mask(self, cols: Int[Tensor, "batch rows"]) -> Tensor | dict[str, Tensor]:
        """The 4D mask of appended copies re-running the slots at ``cols`` (left-padded columns): each sees the
        prefix before its column and itself; on sliding-window layers only prefix columns ``c`` with
        ``col - c < window`` (HF's rule; the cache keeps every position). Per layer type where the config names them."""
        b, R = cols.shape
        c = torch.arange(self.P)[None, None]
        m4 = torch.zeros(b, 1, R, self.P + R, dtype=torch.bool)
        m4[:, 0, :, : self.P] = (c < cols[:, :, None]) & self._prefix[1][:, None].bool()
        m4[:, 0, torch.arange(R), self.P + torch.arange(R)] = True
        if not self._window or self.P <= self._window:
            return m4
        near = torch.ones_like(m4)
        near[:, 0, :, : self.P] = (cols[:, :, None] - c) < self._window
        return windowed_mask(self.model, m4, near)

    def _src(self, source: Tensor | None, l: int) -> Tensor | None:
        """The layer-``l`` replacement shaped ``[b, 1, S, H, d]`` or ``[1, 1, 1, H, d]`` (None: zero)."""
        if source is None:
            return None
        if source.dim() == 3:
            return source[l][None, None, None]
        return source[:, :, l][:, None]

    def _hooks(
        self, masks: Tensor, source: Tensor | None, full_rows: Tensor | None, b: int | None = None
    ) -> list[tuple[str, Callable]]:
        """``hook_z`` replacements: kv rows ``[b, n*S]`` or full rows ``(context, i, s)`` at their slot."""
        n, S, b = masks.shape[0], self.n_slots, b or self.batch.n_contexts
        hooks = []
        for l in range(self.L):
            m_l = masks[:, l]  # [n, H]
            if not m_l.any():
                continue

            def hook(act: Tensor, hook: Any, m_l: Tensor = m_l, src: Tensor | None = self._src(source, l)) -> Tensor:  # noqa: B008 - bound per layer
                m_l = m_l.to(act.device)  # masks and sources live on the host; meet the activation on its device
                src = None if src is None else src.to(act.device, act.dtype)
                keep = m_l[None, :, None, :, None]  # [1, n, 1, H, 1]
                if full_rows is None:  # kv: act [b, n*S, H, d]
                    a = act.view(b, n, S, *act.shape[2:])
                    repl = torch.zeros_like(a) if src is None else src.expand_as(a)
                    return torch.where(keep, repl, a).reshape(act.shape)
                act = act.clone()  # full: act [b*n*S, pos, H, d]; edit each row's own slot
                r, fr = torch.arange(act.shape[0], device=act.device), full_rows.to(act.device)
                at = act[r, fr].view(b, n, S, *act.shape[2:])
                repl = torch.zeros_like(at) if src is None else src.expand_as(at)
                act[r, fr] = torch.where(keep, repl, at).reshape(-1, *act.shape[2:])
                return act

            hooks.append((act_name("z", l), hook))
        return hooks

    def _chunk(self, masks: Tensor, source: Tensor | None) -> Tensor:
        n, S, b = masks.shape[0], self.n_slots, self.batch.n_contexts
        if self.mode == "kv":
            tok, mask, pos, _ = self._prefix
            cols = self._cols.repeat(1, n)  # [b, n*S]: copy (i, s) re-runs slot s
            used = masks.any(0).any(-1).nonzero()[:, 0]
            l0 = int(used.min()) if len(used) else self.L - 1  # blocks below the lowest intervened layer are unchanged
            start = (l0, self._resid_pre[l0].repeat(1, n, 1)) if l0 > 0 else None
            with cache_shim(self.model):
                resid = run_to_final(
                    self.model,
                    tok.gather(1, cols),
                    self._hooks(masks, source, None),
                    attention_mask=self._step_mask(cols),
                    start=start,
                    position_ids=pos.gather(1, cols),
                    **cache_kwargs(self.model, fresh_cache(self._cache)),
                )
            return unembed_labels(self.model, resid, self.label_ids).view(b, n, S, -1).transpose(0, 1)
        cb = max(1, self.max_rows // (n * S))  # contexts per forward: at most max_rows rows (or one context)
        out = []
        for c0 in range(0, b, cb):
            rows = slice(c0, min(b, c0 + cb))
            pos = self.pos[rows]
            m = pos.shape[0]
            rows_pos = pos[:, None, :].expand(m, n, S).reshape(-1)
            src = source if source is None or source.dim() == 3 else source[rows]
            tokens = self.batch.tokens[rows, : self.P].repeat_interleave(n * S, 0)
            resid = run_to_final(self.model, tokens, self._hooks(masks, src, rows_pos, m))
            out.append(
                unembed_labels(self.model, resid[torch.arange(len(rows_pos)), rows_pos], self.label_ids).view(
                    m, n, S, -1
                )
            )
        return torch.cat(out, 0).transpose(0, 1)
