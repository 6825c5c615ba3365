"""analysis.engine.surgery: the copy of a prefix KV cache that serves one forward and keeps nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from mechicl.analysis.engine import surgery
from mechicl.analysis.engine.surgery import cache_kwargs, cache_shim, fresh_cache, new_kv_cache
from tests import helpers


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_fresh_cache_serves_one_forward_and_stores_nothing(arch):
    loaded = helpers.tiny_hf(arch, sliding_window=4)  # gemma: a sliding layer, prefix longer than the window
    hf = loaded.model.original_model
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18]])
    with torch.no_grad(), cache_shim(loaded.model):  # the bridge's attention reads the cache through the shim
        full = hf(tokens).logits[:, -2:]
        cache = new_kv_cache(loaded.model)
        hf(tokens[:, :6], **cache_kwargs(loaded.model, cache))
        stored = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        copy = fresh_cache(cache)
        step = hf(tokens[:, 6:], **cache_kwargs(loaded.model, copy)).logits
    assert torch.allclose(step, full, atol=1e-5)  # the appended tokens saw the whole prefix (as the full forward)
    for layer, twin, (k, v) in zip(cache.layers, copy.layers, stored):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)  # the original is untouched
        assert twin.keys.shape == k.shape  # and the copy did not keep prefix + appended tokens


def test_fresh_cache_serves_repeated_copies_of_the_batch_and_stores_nothing():
    loaded = helpers.tiny_hf("llama")
    hf = loaded.model.original_model
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18]])
    tails = torch.tensor([[9, 10, 11], [16, 17, 18], [20, 21, 22], [23, 24, 25], [9, 26, 27], [28, 17, 29]])
    with torch.no_grad(), cache_shim(loaded.model):
        cache = new_kv_cache(loaded.model, keep_all=True)
        hf(tokens[:, :5], **cache_kwargs(loaded.model, cache))
        stored = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        tiled = fresh_cache(cache, 3)  # rows copy * batch + context: row r continues context r % 2
        step = hf(tails, **cache_kwargs(loaded.model, tiled)).logits
        full = hf(torch.cat([tokens[:, :5].repeat(3, 1), tails], 1)).logits[:, 5:]
    assert torch.allclose(step, full, atol=1e-5)
    for layer, twin, (k, v) in zip(cache.layers, tiled.layers, stored):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)  # the original is untouched
        assert twin.keys.shape == k.shape  # the copy kept neither the tiles nor the appended tokens


def test_a_spilled_cache_reads_back_any_range_of_its_contexts(tmp_path):
    part = DynamicCache()
    keys = torch.randn(5, 2, 7, 3)
    for l in range(3):
        part.update(keys + l, -keys - l, l)
    full = surgery.place_rows(None, part, torch.arange(5), 5, 9)  # right-aligned into 9 columns
    want = [(layer.keys.clone(), layer.values.clone()) for layer in full.layers]
    assert torch.equal(want[1][0][:, :, 2:], keys + 1) and not want[1][0][:, :, :2].any()
    surgery.spill_cache(full, tmp_path / "kv.bin")
    assert all(layer.keys is None for layer in full.layers)
    surgery.load_cache(full, tmp_path / "kv.bin", slice(1, 4))
    for (k, v), layer in zip(want, full.layers):
        assert torch.equal(layer.keys, k[1:4]) and torch.equal(layer.values, v[1:4])
    surgery.load_cache(full, tmp_path / "kv.bin")
    assert all(torch.equal(layer.keys, k) for (k, _), layer in zip(want, full.layers))
    assert [r.indices(5)[:2] for r in surgery.row_ranges(full, 2 * 3 * 2 * 2 * 9 * 3 * 4)] == [(0, 2), (2, 4), (4, 5)]
