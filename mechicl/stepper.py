"""Partial forwards: skip upstream blocks, stop at the final norm, re-run only the readout slot.

``run_to_final`` runs a bridge from a cached residual (blocks before it are
replaced by a function returning the cache, ``_start_at``) up to the final norm's
input. ``ReadoutStepper`` keeps the key/value cache of every position before the
query slot and re-runs only the query token per head-output intervention. Both
are exact (checked against full forwards in the tests and, for the stepper, on
construction); the cost of each is stated on it.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.prompts import PromptBatch
from mechicl.readout import StopForward, run_until, unembed_labels

# ----------------------------------------------------------- forward runs ---


def bridge_of(model: Any) -> Any:
    """The TransformerBridge of a ``LoadedModel`` (or the bridge itself)."""
    return getattr(model, "model", model) if not hasattr(model, "blocks") else model


_TUPLE_OUT: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _blocks_return_tuple(model: Any) -> bool:
    """Whether the model's block loop expects tuples from its blocks (probed once, 2 tokens)."""
    if model in _TUPLE_OUT:
        return _TUPLE_OUT[model]
    seen: dict[str, bool] = {}

    def probe(_m: Any, _a: Any, out: Any) -> None:
        seen["tuple"] = isinstance(out, tuple)
        raise StopForward

    h = model.blocks[0].register_forward_hook(probe)
    try:
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long))
    except StopForward:
        pass
    finally:
        h.remove()
    _TUPLE_OUT[model] = seen.get("tuple", False)
    return _TUPLE_OUT[model]


@contextlib.contextmanager
def _start_at(model: Any, layer: int, resid: Tensor | None) -> Iterator[None]:
    """Make blocks ``0..layer-1`` return ``resid`` (the residual entering ``layer``) without computing.

    The rest of the model's forward (embedding lookup, masks, rotary tables, blocks
    ``layer..``) runs unchanged, so hooks and architecture details stay the model's own.
    """
    if layer <= 0 or resid is None:
        yield
        return
    out = (resid,) if _blocks_return_tuple(model) else resid

    def skip(*args: Any, **kwargs: Any) -> Any:
        return out

    blocks = list(model.blocks)[:layer]
    for blk in blocks:  # object.__setattr__: bridge components forward setattr to the wrapped module
        object.__setattr__(blk, "forward", skip)
    try:
        yield
    finally:
        for blk in blocks:
            blk.__dict__.pop("forward", None)


def run_to_final(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    hooks: Sequence[tuple[str, Callable]] = (),
    *,
    save: Sequence[str] = (),
    store: dict[str, Tensor] | None = None,
    start: tuple[int, Tensor] | None = None,
    **forward_kwargs: Any,
) -> Float[Tensor, "batch pos d_model"]:
    """Residual entering the final norm, with ``hooks`` applied and the outputs of hooks ``save`` kept in ``store``.

    ``start=(l, resid)`` skips blocks ``0..l-1`` (see ``_start_at``). Cost: blocks ``l..`` only,
    no unembedding. Cached tensors are clones (safe against later in-place edits).
    """
    store = store if store is not None else {}

    def saver(name: str) -> Callable:
        def save(x: Tensor, hook: Any) -> None:
            store[name] = x.detach().clone()

        return save

    ctx = _start_at(model, *start) if start is not None else contextlib.nullcontext()
    with ctx:
        return run_until(model, tokens, [*hooks, *((n, saver(n)) for n in save)], **forward_kwargs)


def _act_name(kind: str, layer: int) -> str:
    return {
        "resid_pre": f"blocks.{layer}.hook_resid_pre",
        "attn_out": f"blocks.{layer}.hook_attn_out",
        "mlp_out": f"blocks.{layer}.hook_mlp_out",
        "z": f"blocks.{layer}.attn.hook_z",
        "v": f"blocks.{layer}.attn.hook_v",
        "pattern": f"blocks.{layer}.attn.hook_pattern",
    }[kind]


# ----------------------------------------------------------- readout stepper ---


def _cache_shim(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """transformers 5 passes the KV cache as ``cache=``; TL 4.3's attention bridge reads ``past_key_values``."""
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
    return args, kwargs


def _fresh_cache(cache: Any, repeats: int) -> Any:
    """A copy of a prefix KV cache whose updates do not touch the original, batch-repeated."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    if repeats > 1:
        new.batch_repeat_interleave(repeats)
    return new


class ReadoutStepper:
    """Re-run only the query readout slot of every context, with head-output interventions there.

    An intervention replaces head outputs (``hook_z``) at the query slot and nowhere
    else, so every earlier position -- and its keys and values -- is unchanged. On
    construction the prefix (every position before the query slot, left-aligned)
    runs once and its key/value cache is kept. ``run`` then appends ``n`` copies of
    each context's query token, all at the query's position, with a 4D attention
    mask that lets copy ``i`` see the cached prefix and itself only: ``n``
    independent re-runs of one token in one call, sharing one cache (no copies per
    intervention). Construction checks the re-run against the full forward and falls
    back to full forwards (``mode == "full"``) if the model has no usable KV cache
    (e.g. TL-native models, prompts longer than a sliding window) or the check fails.

    Cost: construction 1 forward; ``run`` of ``n`` interventions: ``n`` tokens per
    context (``mode == "kv"``, ``step_tokens`` tokens per call) or ``n`` forwards from
    the lowest intervened layer (``"full"``, ``max_rows`` rows per call), reported in
    ``last_cost`` (forward equivalents). Memory (kv): the prefix cache,
    ``batch x pos x n_layers x 2 x n_kv_heads x d_head`` floats, plus one step.
    """

    def __init__(self, model: Any, batch: PromptBatch, *, max_rows: int = 256, step_tokens: int = 4096, mode: str = "auto",
                 atol: float = 1e-3) -> None:
        self.model = bridge_of(model)
        self.batch = batch
        self.max_rows, self.step_tokens = max_rows, step_tokens
        hf_cfg = getattr(getattr(self.model, "original_model", None), "config", None)
        self._window = int(getattr(hf_cfg, "sliding_window", 0) or 0)
        self.q = batch.readout_pos[:, -1]
        self.n_layers, self.n_heads = int(self.model.cfg.n_layers), int(self.model.cfg.n_heads)
        self.label_ids = batch.label_token_ids
        self.last_cost = 0.0
        self.mode = "full"
        self._kv_cache = None
        z_names = [_act_name("z", l) for l in range(self.n_layers)]
        b, P = batch.n_contexts, int(self.q.max()) + 1
        # left-aligned prefix: row r holds tokens[r, :q_r + 1] at the right end
        tok = torch.zeros(b, P, dtype=torch.long)
        mask = torch.zeros(b, P, dtype=torch.long)
        pos = torch.zeros(b, P, dtype=torch.long)
        for r in range(b):
            n = int(self.q[r]) + 1
            tok[r, P - n :] = batch.tokens[r, :n]
            mask[r, P - n :] = 1
            pos[r, P - n :] = torch.arange(n)
        self._prefix = (tok, mask, pos)
        cache = self._new_cache() if mode in ("auto", "kv") else None
        store: dict[str, Tensor] = {}
        with torch.no_grad():
            if cache is not None:
                try:
                    with self._shim():
                        resid = run_to_final(
                            self.model, tok, save=z_names, store=store, attention_mask=mask, position_ids=pos,
                            **self._cache_kwargs(cache),
                        )
                    if cache.get_seq_length() != P:
                        raise RuntimeError(f"KV cache holds {cache.get_seq_length()} positions, expected {P}")
                    cache.crop(-1)  # drop the query token: steps re-run it
                    self._kv_cache = cache
                except Exception as e:  # noqa: BLE001 - any failure means: use full forwards
                    if mode == "kv":
                        raise
                    warnings.warn(f"ReadoutStepper: KV-cache path unavailable ({type(e).__name__}: {e}); using full forwards")
                    cache, store = None, {}
            if cache is None:
                full = batch.tokens[:, :P]
                res_names = [_act_name("resid_pre", l) for l in range(1, self.n_layers)]
                resid = run_to_final(self.model, full, save=z_names + res_names, store=store)
                self._resid_pre = {l: store[_act_name("resid_pre", l)] for l in range(1, self.n_layers)}
                rows = torch.arange(b)
                self.z = torch.stack([store[n][rows, self.q] for n in z_names], 1)
                self.base_logits = unembed_labels(self.model, resid[rows, self.q], self.label_ids)
            else:
                self.z = torch.stack([store[n][:, -1] for n in z_names], 1)  # [batch, layer, head, d_head]
                self.base_logits = unembed_labels(self.model, resid[:, -1], self.label_ids)
                self.mode = "kv"
                check = self.run(torch.zeros(3, self.n_layers, self.n_heads, dtype=torch.bool), None)
                err = float((check - self.base_logits).abs().max())
                if not err <= atol * max(1.0, float(self.base_logits.abs().max())):
                    if mode == "kv":
                        raise RuntimeError(f"ReadoutStepper KV path differs from the full forward by {err:.3g}")
                    warnings.warn(f"ReadoutStepper: KV re-run differs from the full forward by {err:.3g}; using full forwards")
                    self.__init__(model, batch, max_rows=max_rows, step_tokens=step_tokens, mode="full", atol=atol)  # type: ignore[misc]
                    return
        self.last_cost = 1.0

    @property
    def n_contexts(self) -> int:
        return self.batch.n_contexts

    def _new_cache(self) -> Any:
        hf = getattr(self.model, "original_model", None)
        config = getattr(hf, "config", None)
        if config is None or not hasattr(hf, "generate"):
            return None  # not a Hugging Face causal LM (e.g. TL-native): no KV cache
        try:
            from transformers import DynamicCache

            return DynamicCache(config=config)
        except Exception:  # noqa: BLE001
            return None

    def _cache_kwargs(self, cache: Any) -> dict[str, Any]:
        """transformers >= 5 names the forward's KV-cache argument ``cache``, earlier versions ``past_key_values``."""
        import inspect

        hf = self.model.original_model
        name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        return {name: cache, "use_cache": True}

    @contextlib.contextmanager
    def _shim(self) -> Iterator[None]:
        handles = [blk.attn.register_forward_pre_hook(_cache_shim, with_kwargs=True) for blk in self.model.blocks]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def run(
        self,
        masks: Bool[Tensor, "n layer head"],
        source: Float[Tensor, "... layer head d_head"] | None = None,
        progress: bool = False,
    ) -> Float[Tensor, "n batch n_labels"]:
        """Label logits at the query slot for ``n`` interventions.

        Intervention ``i`` replaces the query-slot output of every head with
        ``masks[i, layer, head]`` by ``source[..., layer, head, :]`` (``None``: zero;
        ``[layer, head, d_head]``: one vector for every context, e.g. a mean;
        ``[batch, layer, head, d_head]``: per context, e.g. a donor run's output).
        """
        n = masks.shape[0]
        b = self.n_contexts
        per = max(1, (self.step_tokens if self.mode == "kv" else self.max_rows) // b)
        if self.mode == "kv" and self._window:
            per = max(1, min(per, self._window - self._prefix[0].shape[1]))
        out = []
        self.last_cost = 0.0
        for c0 in tqdm(range(0, n, per), desc="readout interventions", unit="chunk", disable=not progress, leave=False):
            out.append(self._run_chunk(masks[c0 : c0 + per], source))
        return torch.cat(out, 0) if out else torch.zeros(0, b, len(self.label_ids))

    def _hooks(self, masks: Tensor, source: Tensor | None, n: int, rows_pos: Tensor | None) -> list[tuple[str, Callable]]:
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
                if rows_pos is None:  # kv mode: act [b, n, head, d], intervention i in column i
                    repl = torch.zeros_like(act) if src is None else src.expand_as(act)
                    return torch.where(m_l[None, :, :, None], repl, act)
                a = act.clone()  # full mode: act [b*n, pos, head, d]; edit the query slot only
                at = a[torch.arange(b * n), rows_pos].reshape(b, n, *a.shape[2:])
                repl = torch.zeros_like(at) if src is None else src.expand_as(at)
                a[torch.arange(b * n), rows_pos] = torch.where(m_l[None, :, :, None], repl, at).reshape(b * n, *a.shape[2:])
                return a

            hooks.append((_act_name("z", l), hook))
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
            with self._shim():
                resid = run_to_final(
                    self.model, tok[:, -1:].expand(b, n).contiguous(), self._hooks(masks, source, n, None),
                    attention_mask=m4, position_ids=self.q[:, None].expand(b, n).contiguous(),
                    **self._cache_kwargs(_fresh_cache(self._kv_cache, 1)),
                )
            self.last_cost += n / max(1, int(self.q.float().mean()) + 1)
            return unembed_labels(self.model, resid, self.label_ids).transpose(0, 1)  # [n, b, labels]
        used = masks.any(0).any(-1).nonzero()[:, 0]
        l0 = int(used.min()) if len(used) else L - 1
        P = int(self.q.max()) + 1
        rows_pos = self.q.repeat_interleave(n)
        start = (l0, self._resid_pre[l0].repeat_interleave(n, 0)) if l0 > 0 else None
        resid = run_to_final(
            self.model, self.batch.tokens[:, :P].repeat_interleave(n, 0), self._hooks(masks, source, n, rows_pos), start=start
        )
        self.last_cost += n * (L - l0) / L
        logits = unembed_labels(self.model, resid[torch.arange(b * n), rows_pos], self.label_ids)
        return logits.reshape(b, n, -1).transpose(0, 1)
