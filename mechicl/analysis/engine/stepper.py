"""``ReadoutStepper``: re-run only the query readout slot, with head-output interventions there.

A front-end of the re-run engine (``analysis.engine.reruns``): it keeps the key/value cache of every position
before the query slot and re-runs only the query token per intervention. Exact (checked against full forwards
in the tests and on construction, ``reruns.check_rerun``).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.analysis.engine import reruns
from mechicl.analysis.engine.hooks import act_name, capture, run_to_final, to_host
from mechicl.analysis.engine.readout import unembed_labels
from mechicl.analysis.engine.surgery import sliding_window
from mechicl.data.prompts import PromptBatch
from mechicl.models.device import input_device


class ReadoutStepper:
    """Re-run only the query readout slot of every context, with head-output interventions there.

    An intervention replaces head outputs (``hook_z``) at the query slot and nowhere
    else, so every earlier position -- and its keys and values -- is unchanged. On
    construction the prefix (every position up to the query slot, left-padded,
    ``reruns.left_pad``) runs once and its key/value cache, less the query token, is kept.
    ``run`` then appends ``n`` copies of each context's query token, all at the query's
    position, with a 4D attention mask that lets copy ``i`` see the cached prefix and itself
    only: ``n`` independent re-runs of one token in one call, sharing one cache (no copies
    per intervention). Prompts longer than a sliding attention window (Gemma-3-270M: 512
    tokens, ~60 examples of vader-words) keep every position in every layer's cache and
    apply the window in the steps' masks. Construction checks the re-run against the full
    forward and falls back to full forwards (``mode == "full"``) if the model has no usable
    KV cache (e.g. TL-native models) or the check fails (``reruns.kv_or_full``).

    Cost: construction 1 forward; ``run`` of ``n`` interventions: ``n`` tokens per
    context (``mode == "kv"``, ``step_tokens`` tokens per call) or ``n`` forwards (``"full"``, ``max_rows`` rows
    per call), either way from the lowest layer a call's interventions touch (the residual entering it is kept
    at the query slot; calls are grouped by that layer, ``reruns.layer_chunks``); reported in
    ``last_cost`` (forward equivalents). Memory (kv): the prefix cache,
    ``batch x pos x n_layers x 2 x n_kv_heads x d_head`` floats, and ``batch x n_layers x d_model`` (the
    residual at the query slot), plus one step.
    Devices: ``z`` and the cache stay on the model's device(s); logits come back float32 on the CPU.
    """

    def __init__(
        self,
        model: Any,
        batch: PromptBatch,
        *,
        max_rows: int = 256,
        step_tokens: int = 4096,
        mode: str = "auto",
        atol: float = reruns.ATOL,
    ) -> None:
        self.model, self.batch = model, batch
        self.max_rows, self.step_tokens = max_rows, step_tokens
        self.n_layers, self.n_heads = reruns.dims(model)
        self.q = batch.readout_pos[:, -1]
        self.label_ids = batch.label_token_ids
        self.layout = reruns.left_pad(batch.tokens, self.q)
        self.window = sliding_window(model)
        self._kv_cache = None
        self.mode = "kv" if reruns.kv_or_full("ReadoutStepper", mode, lambda: self._init_kv(atol)) else "full"
        if self.mode == "full":
            self._kv_cache = None
            self._init_full()
        self.last_cost = 1.0

    @property
    def n_contexts(self) -> int:
        return self.batch.n_contexts

    @property
    def width(self) -> int:
        """Positions ``0 .. max(q)`` of the left-padded prefix (query slot included)."""
        return self.layout.width

    @property
    def keep_all(self) -> bool:
        """Contexts longer than the sliding window: the KV cache keeps every position in every layer (a sliding
        layer's cache would evict the oldest and could not drop the query token); the step masks apply the window."""
        return bool(self.window) and self.width > self.window

    def _z_names(self) -> list[str]:
        return [act_name("z", l) for l in range(self.n_layers)]

    @torch.no_grad()
    def _init_kv(self, atol: float) -> None:
        b, width = self.n_contexts, self.width
        store: dict[str, Tensor] = {}
        lay = self.layout
        res_names = [act_name("resid_pre", l) for l in range(1, self.n_layers)]
        hooks = capture(self._z_names() + res_names, store, at=torch.full((b, 1), width - 1))
        cache, resid = reruns.prefix_cache(
            self.model, lay.tokens, hooks, keep_all=self.keep_all, attention_mask=lay.mask, position_ids=lay.pos
        )
        cache.crop(-1)  # drop the query token: steps re-run it
        self._kv_cache = cache
        dev = input_device(self.model)  # a split model's layers live on several devices
        self.z = torch.stack([store[n][:, 0].to(dev) for n in self._z_names()], 1)  # [batch, layer, head, d_head]
        self._resid_pre = {l: store[act_name("resid_pre", l)] for l in range(1, self.n_layers)}  # [batch, 1, d_model]
        self.base_logits = to_host(unembed_labels(self.model, resid[:, -1], self.label_ids))
        self.mode = "kv"
        check = self.run(torch.zeros(3, self.n_layers, self.n_heads, dtype=torch.bool), None)
        reruns.check_rerun("the one-token KV re-run", check, self.base_logits, self.model, atol)

    @torch.no_grad()
    def _init_full(self) -> None:
        store: dict[str, Tensor] = {}
        res_names = [act_name("resid_pre", l) for l in range(1, self.n_layers)]
        hooks = [*capture(self._z_names(), store, at=self.q[:, None]), *capture(res_names, store)]
        resid = run_to_final(self.model, self.batch.tokens[:, : self.width], hooks)
        self._resid_pre = {l: store[act_name("resid_pre", l)] for l in range(1, self.n_layers)}
        dev = input_device(self.model)
        self.z = torch.stack([store[n][:, 0].to(dev) for n in self._z_names()], 1)  # kept at the query slot only
        rows = torch.arange(self.n_contexts)
        self.base_logits = to_host(unembed_labels(self.model, resid[rows, self.q], self.label_ids))

    @torch.no_grad()
    def run(
        self,
        masks: Bool[Tensor, "n layer head"],
        source: Float[Tensor, "... layer head d_head"] | None = None,
        progress: bool = False,
    ) -> Float[Tensor, "n batch n_labels"]:
        """Label logits at the query slot for ``n`` interventions (float32, on the CPU).

        Intervention ``i`` replaces the query-slot output of every head with
        ``masks[i, layer, head]`` by ``source[..., layer, head, :]`` (``None``: zero;
        ``[layer, head, d_head]``: one vector for every context, e.g. a mean;
        ``[batch, layer, head, d_head]``: per context, e.g. a donor run's output).
        """
        n, b = masks.shape[0], self.n_contexts
        per = max(1, (self.step_tokens if self.mode == "kv" else self.max_rows) // b)
        if self.mode == "kv" and self.window and not self.keep_all:  # sliding layers evict past the window
            per = max(1, min(per, self.window - self.width))
        src = source[:, None] if source is not None and source.dim() == 4 else source  # one slot: [batch, 1, ...]
        self.last_cost = 0.0
        step = self._run_kv if self.mode == "kv" else self._run_full
        chunks = reruns.layer_chunks(masks, per, rows=b)  # grouped by the lowest layer (each re-runs from its own)
        parts = [
            (idx, step(masks[idx], src))
            for idx in tqdm(chunks, desc="readout interventions", unit="chunk", disable=not progress, leave=False)
        ]
        return reruns.in_order(parts, n) if parts else torch.zeros(0, b, len(self.label_ids))

    def _run_kv(self, masks: Tensor, source: Tensor | None) -> Tensor:
        """``n`` copies of each context's query token side by side, all at the query's position; copy ``i`` sees
        the cached prefix and itself only, so the copies are independent re-runs."""
        n, b, lay = masks.shape[0], self.n_contexts, self.layout
        pm = self.width - 1  # cached prefix length
        q_pos = self.q[:, None].expand(b, n).contiguous()
        mask = reruns.copies_mask(self.model, lay.mask[:, None, :pm].bool().expand(b, n, pm), q_pos, lay.pos[:, :pm])
        l0 = reruns.lowest_layer(masks)  # blocks below the lowest intervened layer are unchanged: start there
        resid = reruns.rerun(
            self.model,
            self._kv_cache,
            lay.tokens[:, -1:].expand(b, n).contiguous(),
            reruns.z_hooks(masks, source, 1, b),
            attention_mask=mask,
            position_ids=q_pos,
            start=(l0, self._resid_pre[l0].repeat(1, n, 1)) if l0 > 0 else None,
        )
        self.last_cost += n * (self.n_layers - l0) / self.n_layers / max(1, int(self.q.float().mean()) + 1)
        return to_host(unembed_labels(self.model, resid, self.label_ids)).transpose(0, 1)  # [n, b, labels]

    def _run_full(self, masks: Tensor, source: Tensor | None) -> Tensor:
        """``n`` full forwards per context from the lowest intervened layer (the cached residual below it)."""
        n, b, L = masks.shape[0], self.n_contexts, self.n_layers
        l0 = reruns.lowest_layer(masks)
        rows_pos = self.q.repeat_interleave(n)
        start = (l0, self._resid_pre[l0].repeat_interleave(n, 0)) if l0 > 0 else None
        tokens = self.batch.tokens[:, : self.width].repeat_interleave(n, 0)
        resid = run_to_final(self.model, tokens, reruns.z_hooks(masks, source, 1, b, rows_pos), start=start)
        self.last_cost += n * (L - l0) / L
        logits = to_host(unembed_labels(self.model, resid[torch.arange(b * n), rows_pos], self.label_ids))
        return logits.reshape(b, n, -1).transpose(0, 1)
