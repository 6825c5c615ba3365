"""``ReadoutStepper``: re-run only the query readout slot, with head-output interventions there.

It keeps the key/value cache of every position before the query slot and re-runs only the
query token per intervention. Exact (checked against full forwards in the tests and on
construction); the KV-cache plumbing it needs beyond TL hooks is in ``analysis.engine.surgery``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.analysis.engine.hooks import act_name, capture, run_to_final, to_host
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
from mechicl.models.device import input_device, model_dtype


def _left_padded_prefix(
    tokens: Int[Tensor, "batch pos"], q: Int[Tensor, "batch"]
) -> tuple[Int[Tensor, "batch P"], Int[Tensor, "batch P"], Int[Tensor, "batch P"]]:
    """Tokens, attention mask and position ids with row ``r`` holding ``tokens[r, :q_r + 1]`` at the right end
    (left padding), so that every query token sits in the last column."""
    b, P = tokens.shape[0], int(q.max()) + 1
    tok = torch.zeros(b, P, dtype=torch.long)
    mask = torch.zeros(b, P, dtype=torch.long)
    pos = torch.zeros(b, P, dtype=torch.long)
    for r in range(b):
        n = int(q[r]) + 1
        tok[r, P - n :] = tokens[r, :n]
        mask[r, P - n :] = 1
        pos[r, P - n :] = torch.arange(n)
    return tok, mask, pos


class ReadoutStepper:
    """Re-run only the query readout slot of every context, with head-output interventions there.

    An intervention replaces head outputs (``hook_z``) at the query slot and nowhere
    else, so every earlier position -- and its keys and values -- is unchanged. On
    construction the prefix (every position before the query slot, left-aligned)
    runs once and its key/value cache is kept. ``run`` then appends ``n`` copies of
    each context's query token, all at the query's position, with a 4D attention
    mask that lets copy ``i`` see the cached prefix and itself only: ``n``
    independent re-runs of one token in one call, sharing one cache (no copies per
    intervention). Prompts longer than a sliding attention window (Gemma-3-270M: 512
    tokens, ~60 examples of vader-words) keep every position in every layer's cache and
    apply the window in the steps' masks. Construction checks the re-run against the
    full forward and falls back to full forwards (``mode == "full"``) if the model has no
    usable KV cache (e.g. TL-native models) or the check fails.

    Cost: construction 1 forward; ``run`` of ``n`` interventions: ``n`` tokens per
    context (``mode == "kv"``, ``step_tokens`` tokens per call) or ``n`` forwards from
    the lowest intervened layer (``"full"``, ``max_rows`` rows per call), reported in
    ``last_cost`` (forward equivalents). Memory (kv): the prefix cache,
    ``batch x pos x n_layers x 2 x n_kv_heads x d_head`` floats, plus one step.
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
        atol: float = 1e-3,
    ) -> None:
        self.model = model
        self.batch = batch
        self.max_rows, self.step_tokens = max_rows, step_tokens
        self._window = sliding_window(self.model)
        self.q = batch.readout_pos[:, -1]
        self.n_layers, self.n_heads = int(self.model.cfg.n_layers), int(self.model.cfg.n_heads)
        self.label_ids = batch.label_token_ids
        self.last_cost = 0.0
        self.mode = "full"
        self._kv_cache = None
        z_names = [act_name("z", l) for l in range(self.n_layers)]
        b, P = batch.n_contexts, int(self.q.max()) + 1
        tok, mask, pos = self._prefix = _left_padded_prefix(batch.tokens, self.q)
        cache = new_kv_cache(self.model, keep_all=self._keep_all) if mode in ("auto", "kv") else None
        store: dict[str, Tensor] = {}
        with torch.no_grad():
            if cache is not None:
                try:
                    with cache_shim(self.model):
                        resid = run_to_final(
                            self.model,
                            tok,
                            capture(z_names, store, at=torch.full((b, 1), P - 1)),
                            attention_mask=mask,
                            position_ids=pos,
                            **cache_kwargs(self.model, cache),
                        )
                    if cache.get_seq_length() != P:
                        raise RuntimeError(f"KV cache holds {cache.get_seq_length()} positions, expected {P}")
                    cache.crop(-1)  # drop the query token: steps re-run it
                    self._kv_cache = cache
                except Exception as e:  # noqa: BLE001 - any failure means: use full forwards
                    if mode == "kv":
                        raise
                    warnings.warn(
                        f"ReadoutStepper: KV-cache path unavailable ({type(e).__name__}: {e}); using full forwards",
                        stacklevel=2,
                    )
                    cache, store = None, {}
            if cache is None:
                full = batch.tokens[:, :P]
                res_names = [act_name("resid_pre", l) for l in range(1, self.n_layers)]
                resid = run_to_final(
                    self.model, full, [*capture(z_names, store, at=self.q[:, None]), *capture(res_names, store)]
                )
                self._resid_pre = {l: store[act_name("resid_pre", l)] for l in range(1, self.n_layers)}
                rows, dev = torch.arange(b), input_device(self.model)
                self.z = torch.stack([store[n][:, 0].to(dev) for n in z_names], 1)  # kept at the query slot only
                self.base_logits = to_host(unembed_labels(self.model, resid[rows, self.q], self.label_ids))
            else:
                dev = input_device(self.model)  # a split model's layers live on several devices
                self.z = torch.stack([store[n][:, 0].to(dev) for n in z_names], 1)  # [batch, layer, head, d_head]
                self.base_logits = to_host(unembed_labels(self.model, resid[:, -1], self.label_ids))
                self.mode = "kv"
                check = self.run(torch.zeros(3, self.n_layers, self.n_heads, dtype=torch.bool), None)
                err = float((check - self.base_logits).abs().max())
                # half precision: the one-token re-run rounds differently from the full forward (measured 0.12 / 0.16
                # on logits of ~30 / ~24 for SmolLM2 / Gemma in bfloat16); a broken cache errs by O(|logit|)
                tol = max(atol, 2 * torch.finfo(model_dtype(self.model)).eps)
                if not err <= tol * max(1.0, float(self.base_logits.abs().max())):
                    if mode == "kv":
                        raise RuntimeError(f"ReadoutStepper KV path differs from the full forward by {err:.3g}")
                    warnings.warn(
                        f"ReadoutStepper: KV re-run differs from the full forward by {err:.3g}; using full forwards",
                        stacklevel=2,
                    )
                    self.__init__(model, batch, max_rows=max_rows, step_tokens=step_tokens, mode="full", atol=atol)  # type: ignore[misc]
                    return
        self.last_cost = 1.0

    @property
    def _keep_all(self) -> bool:
        """Contexts longer than the sliding window: the KV cache keeps every position in every layer (a sliding
        layer's cache would evict the oldest and could not drop the query token); ``_windowed`` masks the window."""
        return bool(self._window) and self._prefix[0].shape[1] > self._window

    def _windowed(self, m4: Tensor) -> Tensor | dict[str, Tensor]:
        """A step's 4D mask, with the sliding window applied where the cache keeps positions the window hides: the
        query (position ``q``) sees prefix positions ``p`` with ``q - p < window`` on sliding layers
        (``surgery.windowed_mask``). Cost: two mask copies."""
        if not self._keep_all:
            return m4
        pm = self._prefix[0].shape[1] - 1
        near = torch.ones_like(m4)  # the appended copies see themselves (distance 0)
        near[:, 0, :, :pm] = ((self.q[:, None] - self._prefix[2][:, :pm]) < self._window)[:, None, :]
        return windowed_mask(self.model, m4, near)

    @property
    def n_contexts(self) -> int:
        return self.batch.n_contexts

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
        n = masks.shape[0]
        b = self.n_contexts
        per = max(1, (self.step_tokens if self.mode == "kv" else self.max_rows) // b)
        if self.mode == "kv" and self._window and not self._keep_all:  # sliding layers evict past the window
            per = max(1, min(per, self._window - self._prefix[0].shape[1]))
        out = []
        self.last_cost = 0.0
        for c0 in tqdm(range(0, n, per), desc="readout interventions", unit="chunk", disable=not progress, leave=False):
            out.append(self._run_chunk(masks[c0 : c0 + per], source))
        return torch.cat(out, 0) if out else torch.zeros(0, b, len(self.label_ids))

    def _hooks(
        self, masks: Tensor, source: Tensor | None, n: int, rows_pos: Tensor | None
    ) -> list[tuple[str, Callable]]:
        b = self.n_contexts
        hooks = []
        for l in range(self.n_layers):
            m_l = masks[:, l]  # [n, head]
            if not m_l.any():
                continue
            if source is None:
                src = None
            elif source.dim() == 3:
                src = source[l][None, None]  # [1, 1, head, d]
            else:
                src = source[:, l][:, None]  # [batch, 1, head, d]

            def hook(act: Tensor, hook: Any, m_l: Tensor = m_l, src: Tensor | None = src) -> Tensor:
                # rows are context-major: row = context * n + intervention
                m_l = m_l.to(act.device)
                src = None if src is None else src.to(act.device, act.dtype)
                if rows_pos is None:  # kv mode: act [b, n, head, d], intervention i in column i
                    repl = torch.zeros_like(act) if src is None else src.expand_as(act)
                    return torch.where(m_l[None, :, :, None], repl, act)
                a = act.clone()  # full mode: act [b*n, pos, head, d]; edit the query slot only
                r, rp = torch.arange(b * n, device=a.device), rows_pos.to(a.device)
                at = a[r, rp].reshape(b, n, *a.shape[2:])
                repl = torch.zeros_like(at) if src is None else src.expand_as(at)
                a[r, rp] = torch.where(m_l[None, :, :, None], repl, at).reshape(b * n, *a.shape[2:])
                return a

            hooks.append((act_name("z", l), hook))
        return hooks

    def _run_chunk(self, masks: Tensor, source: Tensor | None) -> Tensor:
        n, b, L = masks.shape[0], self.n_contexts, self.n_layers
        if self.mode == "kv":
            # n copies of each context's query token side by side, all at the query's position; a 4D mask
            # lets copy i see the cached prefix and itself only, so the copies are independent re-runs
            tok, mask, _ = self._prefix
            pm = tok.shape[1] - 1  # cached prefix length
            m4 = torch.zeros(b, 1, n, pm + n, dtype=torch.bool)
            m4[:, 0, :, :pm] = mask[:, None, :pm].bool()
            m4[:, 0, torch.arange(n), pm + torch.arange(n)] = True
            with cache_shim(self.model):
                resid = run_to_final(
                    self.model,
                    tok[:, -1:].expand(b, n).contiguous(),
                    self._hooks(masks, source, n, None),
                    attention_mask=self._windowed(m4),
                    position_ids=self.q[:, None].expand(b, n).contiguous(),
                    **cache_kwargs(self.model, fresh_cache(self._kv_cache)),
                )
            self.last_cost += n / max(1, int(self.q.float().mean()) + 1)
            return to_host(unembed_labels(self.model, resid, self.label_ids)).transpose(0, 1)  # [n, b, labels]
        used = masks.any(0).any(-1).nonzero()[:, 0]
        l0 = int(used.min()) if len(used) else L - 1
        P = int(self.q.max()) + 1
        rows_pos = self.q.repeat_interleave(n)
        start = (l0, self._resid_pre[l0].repeat_interleave(n, 0)) if l0 > 0 else None
        resid = run_to_final(
            self.model,
            self.batch.tokens[:, :P].repeat_interleave(n, 0),
            self._hooks(masks, source, n, rows_pos),
            start=start,
        )
        self.last_cost += n * (L - l0) / L
        logits = to_host(unembed_labels(self.model, resid[torch.arange(b * n), rows_pos], self.label_ids))
        return logits.reshape(b, n, -1).transpose(0, 1)
