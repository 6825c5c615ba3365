"""The one module that reaches under TransformerLens's hooks: skipped blocks and a KV-cache shim.

TL hooks can read and replace activations, but not (a) stop blocks from computing, (b) change
the keyword arguments a wrapped Hugging Face module receives, or (c) stay registered across calls of
``run_with_hooks`` (``count_block_calls``, the report's forward counter). Two speed-ups need (a), (b):

* ``start_at``: blocks ``0..l-1`` return a cached residual instead of computing it (the upstream
  skip of exact patching). The bridge's ``start_at_layer`` re-enters at block ``l`` but, per its
  docstring and ``benchmarks/bench_patching.py``, still executes blocks ``0..l-1``. Done by
  replacing the blocks' ``forward`` for the duration of a call.
* ``cache_shim``: transformers 5 passes the KV cache to attention as ``cache=``; TL 4.3's
  attention bridge reads ``past_key_values``, so without a ``forward_pre_hook`` that maps the
  keyword the cache is silently ignored (``ReadoutStepper`` checks itself against full forwards).

It also owns the KV caches' storage: ``place_rows`` (a cache built in chunks, one block for all layers) and
``spill_cache`` / ``load_cache`` (the block kept in a scratch file the caller names between uses and read back by
ranges of contexts, so a finder stage holds a slice of one cache in memory at a time; the only files an analysis
writes, removed by the caller).

Checked against transformer-lens 4.3.0, transformers 5.24 and torch 2.13. Everything else in
mechicl intervenes through TL hooks (``analysis.engine.hooks``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from mechicl.models.device import input_device
from mechicl.models.weights import read_into

_TUPLE_OUT: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


class _Probed(Exception):
    """Ends the two-token probe forward once block 0 has answered."""


def _blocks_return_tuple(model: Any) -> bool:
    """Whether the model's block loop expects tuples from its blocks (probed once, 2 tokens).

    A raw forward hook on block 0: TL's ``hook_out`` sees the residual after the bridge unpacked it,
    so it cannot tell what the block itself returned.
    """
    if model in _TUPLE_OUT:
        return _TUPLE_OUT[model]
    seen: dict[str, bool] = {}

    def probe(_m: Any, _a: Any, out: Any) -> None:
        seen["tuple"] = isinstance(out, tuple)
        raise _Probed

    h = model.blocks[0].register_forward_hook(probe)
    try:
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long, device=input_device(model)))
    except _Probed:
        pass
    finally:
        h.remove()
    _TUPLE_OUT[model] = seen.get("tuple", False)
    return _TUPLE_OUT[model]


@contextlib.contextmanager
def start_at(model: Any, layer: int, resid: Tensor | None) -> Iterator[None]:
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


@contextlib.contextmanager
def count_block_calls(model: Any) -> Iterator[dict[str, int]]:
    """Count the calls of the model's last block and the rows they carry, over any number of forwards.

    A raw forward-pre hook because TL's ``run_with_hooks`` removes its hooks at the end of every call,
    while this count spans many calls (partial re-runs that start mid-model or run one token included).
    """
    counts = {"calls": 0, "rows": 0}

    def count(module: Any, args: tuple) -> None:
        counts["calls"] += 1
        counts["rows"] += int(args[0].shape[0]) if args and hasattr(args[0], "shape") else 0

    handle = model.blocks[-1].register_forward_pre_hook(count)
    try:
        yield counts
    finally:
        handle.remove()


def _cache_shim(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """transformers 5 passes the KV cache as ``cache=``; TL 4.3's attention bridge reads ``past_key_values``."""
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
    return args, kwargs


@contextlib.contextmanager
def cache_shim(model: Any) -> Iterator[None]:
    """Map ``cache=`` to ``past_key_values`` on every attention bridge for the duration of a call."""
    handles = [blk.attn.register_forward_pre_hook(_cache_shim, with_kwargs=True) for blk in model.blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def new_kv_cache(model: Any, *, keep_all: bool = False) -> Any:
    """An empty transformers ``DynamicCache`` for the bridge's HF model, or None (e.g. TL-native models).

    ``keep_all``: every layer keeps every position (no sliding-window layers, which evict the oldest
    entries once prefix + appended tokens pass the window); the caller's mask must then do what the
    window did (``windowed_mask``).
    """
    hf = getattr(model, "original_model", None)
    config = getattr(hf, "config", None)
    if config is None or not hasattr(hf, "generate"):
        return None
    try:
        return DynamicCache() if keep_all else DynamicCache(config=config)
    except Exception:  # noqa: BLE001 - a config DynamicCache cannot take: no KV path
        return None


def sliding_window(model: Any) -> int:
    """The bridged HF model's sliding attention window in tokens (Gemma-3-270M: 512), 0 when it has none."""
    return int(getattr(getattr(getattr(model, "original_model", None), "config", None), "sliding_window", 0) or 0)


def windowed_mask(model: Any, mask: Tensor, near: Tensor) -> Tensor | dict[str, Tensor]:
    """The 4D ``attention_mask`` of a forward over a cache that keeps every position (``new_kv_cache(keep_all=True)``):
    ``mask`` on full-attention layers, ``mask & near`` on sliding-window layers (``near``, broadcast against ``mask``:
    the key is within the query's window, ``q - p < window``, HF's rule). Given as the ``{layer type: mask}`` mapping
    HF's Gemma-3 takes where the config names layer types, else ``mask & near`` for every layer."""
    slide = mask & near
    types = getattr(getattr(getattr(model, "original_model", None), "config", None), "layer_types", None)
    return {t: slide if t == "sliding_attention" else mask for t in set(types)} if types else slide


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """Forward kwargs passing ``cache``: transformers >= 5 names the argument ``cache``, earlier ``past_key_values``."""
    hf = model.original_model
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def fresh_cache(cache: Any, repeats: int = 1, keep: int | None = None) -> Any:
    """A copy of a prefix KV cache for one forward of appended tokens, optionally for ``repeats`` copies
    of the batch laid out as ``tokens.repeat(repeats, 1)`` (row ``copy * batch + context``), and optionally
    of its first ``keep`` positions only (views, no copy: the appended tokens continue from position ``keep``).

    Its updates touch neither the original nor the copy: each layer's update runs on a throwaway
    copy of the layer, so ``prefix + appended`` keys and values live only while that layer attends.
    Storing them (what a ``DynamicLayer`` does) kept a second copy of the whole prefix cache alive
    until the forward ended: 0.35 GB for 32 Gemma-3 contexts of 300 tokens. With ``repeats > 1`` a
    layer tiles its prefix only while it attends, so one layer's ``repeats x`` prefix is alive at a
    time, not ``repeats x`` the whole cache. The copy must therefore serve one forward only (the
    steppers' and ``prefix_reuse``'s use).
    """
    new = copy.copy(cache)
    new.layers = [_transient(_cropped(layer, keep), repeats) for layer in cache.layers]
    return new


def _cropped(layer: Any, keep: int | None) -> Any:
    """A shallow copy of a cache layer, holding views of its first ``keep`` positions (all when None)."""
    twin = copy.copy(layer)
    if keep is not None and twin.get_seq_length() > keep:
        twin.keys, twin.values = twin.keys[..., :keep, :], twin.values[..., :keep, :]
    return twin


def _transient(layer: Any, tile: int = 1) -> Any:
    """Make ``layer.update`` return what the layer's own update returns (on its prefix tiled ``tile``
    times along the batch), without keeping it. The method holds the layer weakly: a strong reference would be
    a cycle (layer -> method -> layer), alive until the garbage collector runs, and with it the keys and values
    the layer views (a spilled cache's whole block, read back per call: ``spill_cache``)."""
    cls_update = type(layer).update
    ref = weakref.ref(layer)

    def update(*args: Any, **kwargs: Any) -> Any:
        twin = copy.copy(ref())
        if tile > 1 and twin.get_seq_length() > 0:
            twin.keys, twin.values = twin.keys.repeat(tile, 1, 1, 1), twin.values.repeat(tile, 1, 1, 1)
        return cls_update(twin, *args, **kwargs)

    layer.update = update
    return layer


def place_rows(full: Any | None, part: Any, rows: Tensor, n_rows: int, width: int) -> Any:
    """Write ``part`` (the KV cache of a chunk of left-padded rows, at its own width) into ``rows`` of a
    ``n_rows x width`` cache, right-aligned (a left-padded row's last token sits in the last column of either
    layout); columns left of the chunk's width stay zero (pad columns: masked). ``full`` is allocated from
    ``part``'s layers on the first call (``None``): every layer's keys and values are views of one block
    ``[n_rows, layer, 2, kv_heads, width, d_head]``, context-major, so the rows of a range of contexts are one
    run of bytes (``spill_cache`` / ``load_cache``). One allocation, handed back to the OS whole when freed.
    Memory: the full cache once; the chunk is copied, not kept."""
    if full is None:
        k = part.layers[0].keys
        if any(layer.keys.shape[1:] != k.shape[1:] or layer.values.shape != layer.keys.shape for layer in part.layers):
            raise ValueError("a chunked cache needs layers of one shape (kv heads, positions, d_head)")
        block = k.new_zeros(n_rows, len(part.layers), 2, k.shape[1], width, k.shape[-1])
        full = copy.copy(part)
        full.layers = [copy.copy(layer) for layer in part.layers]
        _attach(full, block)
    if len(full.layers) != len(part.layers):
        raise ValueError(f"a chunk cache of {len(part.layers)} layers cannot fill one of {len(full.layers)}")
    for dst, src in zip(full.layers, part.layers):
        w = src.keys.shape[-2]
        dst.keys[rows, ..., width - w :, :] = src.keys
        dst.values[rows, ..., width - w :, :] = src.values
    return full


def _attach(cache: Any, block: Tensor | None) -> None:
    """Point every layer's keys and values at ``block[:, layer, 0]`` and ``block[:, layer, 1]`` (None: drop them)."""
    cache.mechicl_block = block
    for l, layer in enumerate(cache.layers):
        layer.keys, layer.values = (None, None) if block is None else (block[:, l, 0], block[:, l, 1])


def spill_cache(cache: Any, path: Path) -> None:
    """Write a ``place_rows`` cache's block to ``path`` (its bytes as they lie) and drop it from memory.
    Cost: one write of the block (Gemma-3-270M: 37 KB a token); its memory returns to the OS at once."""
    block = cache.mechicl_block
    block.view(torch.uint8).numpy().tofile(path)
    cache.mechicl_spec = (tuple(block.shape), block.dtype)
    _attach(cache, None)


def row_ranges(cache: Any, budget: int) -> list[slice]:
    """Ranges of a spilled cache's contexts whose rows together stay under ``budget`` bytes (one row at least)."""
    shape, dtype = cache.mechicl_spec
    per = max(1, budget // (math.prod(shape[1:]) * dtype.itemsize))
    return [slice(r, min(shape[0], r + per)) for r in range(0, shape[0], per)]


def load_cache(cache: Any, path: Path, rows: slice | None = None) -> None:
    """Read a spilled cache back from ``path`` (all rows, or the contiguous ``rows``: one read of their bytes,
    straight into the new block) and re-attach its layers."""
    shape, dtype = cache.mechicl_spec
    start, stop, _ = (rows or slice(None)).indices(shape[0])
    block = torch.empty(stop - start, *shape[1:], dtype=dtype)
    row_bytes = block[0].numel() * block.element_size() if len(block) else 0
    with open(path, "rb") as f:
        if not read_into(f, start * row_bytes, block):
            raise OSError(f"{path}: the spilled cache is shorter than its {shape[0]} rows")
    _attach(cache, block)


def drop_cache(cache: Any) -> None:
    """Drop a loaded cache's block again (its file stays: ``load_cache`` reads it next time)."""
    _attach(cache, None)


def joined_cache(first: Any, second: Any) -> Any:
    """One KV cache holding ``first``'s positions then ``second``'s, per layer (``[batch, kv_heads, 2 x pos, d]``):
    two renderings of the same contexts side by side, so that an appended token's 4D mask can pick, position by
    position, which rendering's keys and values it attends to (``SlotStepper.run_mixed``). Keys are cached after
    the rotary embedding, so a copied position keeps its own position id. Memory: the two caches again."""
    if len(first.layers) != len(second.layers):
        raise ValueError(f"caches of {len(first.layers)} and {len(second.layers)} layers cannot be joined")
    new = copy.copy(first)
    new.layers = []
    for a, b in zip(first.layers, second.layers):
        if a.keys.shape != b.keys.shape:
            raise ValueError(f"caches of shapes {tuple(a.keys.shape)} and {tuple(b.keys.shape)} cannot be joined")
        layer = copy.copy(a)
        layer.keys, layer.values = torch.cat([a.keys, b.keys], -2), torch.cat([a.values, b.values], -2)
        new.layers.append(layer)
    return new
