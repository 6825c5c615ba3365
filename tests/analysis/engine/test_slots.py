"""SlotStepper against a brute-force reference: one hooked full forward per (intervention, slot)."""

from __future__ import annotations

import pytest
import torch

from mechicl.analysis.engine.hooks import head_masks, run_to_final
from mechicl.analysis.engine.readout import unembed_labels
from mechicl.analysis.engine.slots import SlotStepper
from tests import helpers

SEED = 0


def _reference(loaded, b, k_min, heads, source):
    """Logits at each slot when ``heads`` are replaced at that slot only (one forward per slot)."""
    rows = torch.arange(b.n_contexts)
    out = []
    for j in range(k_min, b.n_examples):
        q = b.readout_pos[:, j]

        def make(l):
            def hook(z, hook):
                z = z.clone()
                for ll, h in heads:
                    if ll == l:
                        z[rows, q, h] = 0.0 if source is None else source[:, j - k_min, l, h]
                return z

            return hook

        with torch.no_grad():
            resid = run_to_final(loaded.model, b.tokens, [(f"blocks.{l}.attn.hook_z", make(l)) for l in range(2)])
            out.append(unembed_labels(loaded.model, resid[rows, q], b.label_token_ids))
    return torch.stack(out, 1)  # [b, S, labels]


@pytest.mark.parametrize("model", ["tiny", "tiny-llama", "tiny-gemma"])
def test_slot_interventions_equal_hooked_full_forwards(tiny, model):
    loaded = {"tiny": tiny, "tiny-llama": helpers.tiny_hf("llama"), "tiny-gemma": helpers.tiny_hf("gemma")}[model]
    task = helpers.toy_task(3)
    b = helpers.batch(loaded, task, "flipped", n_contexts=3, n_examples=7, seed=2)
    st = SlotStepper(loaded.model, b, k_min=3)
    assert st.mode == ("full" if model == "tiny" else "kv")
    assert st.n_slots == 4 and st.z.shape[:3] == (3, 4, 2)
    donor = st.z[torch.tensor([1, 2, 0])]  # another context's output at the same slot
    sets = [[], [(0, 1)], [(0, 1), (1, 3)], [(1, 2)]]  # the last starts at block 1 (block 0 skipped)
    for source in (None, donor):
        got = st.run(head_masks(sets, 2, 4), source)
        assert got.shape == (4, 3, 4, 3)
        for i, heads in enumerate(sets):
            ref = _reference(loaded, b, 3, heads, source)
            assert torch.allclose(got[i], ref, atol=1e-4), (model, i, float((got[i] - ref).abs().max()))
    assert torch.allclose(st.base_logits, _reference(loaded, b, 3, [], None), atol=1e-4)


def test_chunking_does_not_change_results():
    loaded = helpers.tiny_hf("llama")
    b = helpers.batch(loaded, helpers.toy_task(), "default", n_contexts=4, n_examples=6)
    masks = head_masks([[(l, h)] for l in range(2) for h in range(4)], 2, 4)
    one = SlotStepper(loaded.model, b, k_min=2, step_tokens=1).run(masks)
    many = SlotStepper(loaded.model, b, k_min=2, step_tokens=10_000).run(masks)
    assert torch.allclose(one, many, atol=1e-5)
    capped = SlotStepper(loaded.model, b, k_min=2, score_bytes=1)  # the score budget forces one intervention a step
    assert capped._kv_chunk(len(masks)) == 1
    assert torch.allclose(capped.run(masks), many, atol=1e-5)


def test_runs_do_not_grow_the_prefix_cache():
    loaded = helpers.tiny_hf("gemma")
    b = helpers.batch(loaded, helpers.toy_task(), "flipped", n_contexts=3, n_examples=6, seed=1)
    st = SlotStepper(loaded.model, b, k_min=2)
    masks = head_masks([[(0, 1)], [(1, 2), (0, 3)]], 2, 4)
    before = st.run(masks, st.z[torch.tensor([2, 0, 1])])
    lengths = [layer.keys.shape[-2] for layer in st._cache.layers]
    assert lengths == [st.width] * len(lengths)  # appended steps are not stored in the prefix cache
    assert torch.equal(before, st.run(masks, st.z[torch.tensor([2, 0, 1])]))  # so a second run sees the same prefix


def test_k_min_out_of_range_is_a_clear_error(tiny):
    b = helpers.batch(tiny, helpers.toy_task(), "default", n_contexts=2, n_examples=4)
    with pytest.raises(ValueError, match="k_min"):
        SlotStepper(tiny.model, b, k_min=4)


@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
def test_attribution_is_the_first_order_effect_of_each_slot_replacement(tiny, model):
    """On a tiny replacement the estimate matches the exact change; the gradient is the slot's own."""
    loaded = tiny if model == "tiny" else helpers.tiny_hf("llama")
    b = helpers.batch(loaded, helpers.toy_task(), "default", n_contexts=3, n_examples=6, seed=1)
    st = SlotStepper(loaded.model, b, k_min=2)
    eps = 1e-3
    noise = torch.randn(st.z.shape, generator=torch.Generator().manual_seed(SEED)).to(st.z.dtype)
    source = st.z + eps * noise  # seeded: the global generator's state depends on which tests ran before
    p_true = lambda lg, y: torch.softmax(lg.double(), -1).gather(-1, y[..., None])[..., 0]  # noqa: E731
    est = st.attribution(source, p_true)  # [b, S, L, H]
    heads = [(l, h) for l in range(2) for h in range(4)]
    exact = p_true(st.run(head_masks([[x] for x in heads], 2, 4), source), st.true_labels.expand(len(heads), -1, -1))
    exact = exact - p_true(st.base_logits, st.true_labels)[None]
    est = est.permute(2, 3, 0, 1).reshape(len(heads), 3, st.n_slots).double()
    assert torch.allclose(est, exact, atol=5e-6, rtol=0.05), float((est - exact).abs().max())
    assert exact.abs().max() > 1e-5  # the check is not vacuous


def test_steps_past_a_sliding_window_keep_the_prefix_exact():
    """Gemma-3 layers with a sliding window: prefix + appended steps may pass the window (the cache keeps
    every position)."""
    probe = helpers.tiny_hf("gemma")
    b = helpers.batch(probe, helpers.toy_task(), "flipped", n_contexts=2, n_examples=6, seed=4)
    P = int(b.readout_pos[:, -1].max()) + 1
    loaded = helpers.tiny_hf("gemma", sliding_window=P)
    st = SlotStepper(loaded.model, b, k_min=1, step_tokens=10_000)
    assert st.mode == "kv" and P + 8 * st.n_slots > P  # one chunk of 8 interventions passes the window
    sets = [[(l, h)] for l in range(2) for h in range(4)]
    got = st.run(head_masks(sets, 2, 4))
    for i, heads in enumerate(sets):
        assert torch.allclose(got[i], _reference(loaded, b, 1, heads, None), atol=1e-4)


@pytest.mark.parametrize("window", [6, 12])
def test_contexts_longer_than_a_sliding_window_equal_hooked_full_forwards(window):
    """Prefixes far past the window (~30 tokens vs 6 or 12): the appended re-runs see only the window's columns on
    sliding layers (per-layer-type masks), and equal full forwards, where HF applies the window itself."""
    loaded = helpers.tiny_hf("gemma", sliding_window=window)
    b = helpers.batch(loaded, helpers.toy_task(), "flipped", n_contexts=2, n_examples=6, seed=4)
    assert int(b.readout_pos[:, 1].min()) > window  # every slot's query is past the window
    st = SlotStepper(loaded.model, b, k_min=1)
    assert st.mode == "kv" and isinstance(st._step_mask(st._cols), dict)
    sets = [[], [(0, 1)], [(1, 2)], [(0, 0), (1, 3)]]
    donor = st.z[torch.tensor([1, 0])]
    for source in (None, donor):
        got = st.run(head_masks(sets, 2, 4), source)
        for i, heads in enumerate(sets):
            ref = _reference(loaded, b, 1, heads, source)
            assert torch.allclose(got[i], ref, atol=1e-4), (window, i, float((got[i] - ref).abs().max()))
    full = SlotStepper(loaded.model, b, k_min=1, mode="full")
    metric = lambda logits, true: logits.log_softmax(-1).gather(-1, true[..., None])[..., 0]  # noqa: E731
    assert torch.allclose(st.attribution(None, metric), full.attribution(None, metric), atol=1e-4)


def test_full_mode_groups_contexts_without_changing_results(tiny):
    b = helpers.batch(tiny, helpers.toy_task(), "default", n_contexts=5, n_examples=5)
    masks = head_masks([[(0, 1)], [(1, 2)]], 2, 4)
    small = SlotStepper(tiny.model, b, k_min=1, max_rows=3).run(masks)
    big = SlotStepper(tiny.model, b, k_min=1, max_rows=10_000).run(masks)
    assert torch.allclose(small, big, atol=1e-5)


@pytest.mark.parametrize("model", ["llama", "gemma"])
def test_chunked_build_of_rows_of_unequal_length_equals_hooked_full_forwards(model):
    """``build_tokens=1``: every context is built alone at its own width and placed into the left-padded cache."""
    loaded = helpers.tiny_hf(model)
    b = helpers.batch(loaded, helpers.toy_task(3), "flipped", n_contexts=4, n_examples=7, seed=5)
    last = b.readout_pos[:, -1]
    assert len(set(last.tolist())) > 1, "the check needs contexts of unequal length"
    one = SlotStepper(loaded.model, b, k_min=3, build_tokens=1)
    whole = SlotStepper(loaded.model, b, k_min=3, build_tokens=10_000)
    assert one.mode == whole.mode == "kv"
    assert torch.allclose(one.z, whole.z, atol=1e-5) and torch.allclose(one.base_logits, whole.base_logits, atol=1e-5)
    sets = [[(0, 1)], [(1, 2), (0, 3)]]
    got = one.run(head_masks(sets, 2, 4), one.z[torch.tensor([3, 0, 1, 2])])
    for i, heads in enumerate(sets):
        ref = _reference(loaded, b, 3, heads, one.z[torch.tensor([3, 0, 1, 2])])
        assert torch.allclose(got[i], ref, atol=1e-4), float((got[i] - ref).abs().max())
    assert torch.allclose(one.base_logits, _reference(loaded, b, 3, [], None), atol=1e-4)


def test_a_spilled_cache_gives_the_same_results_and_is_out_of_memory_between_calls(tmp_path):
    loaded = helpers.tiny_hf("gemma")
    b = helpers.batch(loaded, helpers.toy_task(3), "flipped", n_contexts=3, n_examples=6, seed=4)
    masks = head_masks([[(0, 1)], [(1, 2), (0, 3)]], 2, 4)
    kept, spilled = SlotStepper(loaded.model, b, k_min=2), SlotStepper(loaded.model, b, k_min=2)
    spilled.spill(tmp_path / "kv.pt")
    assert (tmp_path / "kv.pt").is_file()
    assert all(layer.keys is None for layer in spilled._cache.layers)  # nothing of it left in memory
    src = kept.z[torch.tensor([2, 0, 1])]
    assert torch.equal(spilled.run(masks, src), kept.run(masks, src))
    assert all(layer.keys is None for layer in spilled._cache.layers)  # read back for the call, dropped after
    p_true = lambda lg, y: lg.softmax(-1).gather(-1, y[..., None])[..., 0]  # noqa: E731
    assert torch.equal(spilled.attribution(src, p_true), kept.attribution(src, p_true))
    donor = SlotStepper(loaded.model, helpers.batch(loaded, helpers.toy_task(3), "default", 3, 6, seed=4), k_min=2)
    fd = torch.zeros(1, 3, spilled.n_slots, spilled.width, dtype=torch.bool)
    fd[..., :4] = True
    got, want = spilled.run_mixed(donor, fd), kept.run_mixed(donor, fd)
    assert torch.equal(got[0], want[0])


def test_a_run_leaves_no_reference_cycle_behind():
    """A cycle through the transient cache copies kept their keys and values (a spilled cache's whole block read
    back for the call) alive until the garbage collector ran: 14 unreachable objects a run before the fix."""
    import gc

    loaded = helpers.tiny_hf("gemma")
    st = SlotStepper(loaded.model, helpers.batch(loaded, helpers.toy_task(3), "flipped", 3, 6, seed=4), k_min=2)
    gc.collect()
    gc.disable()
    try:
        st.run(head_masks([[(0, 1)]], 2, 4))
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_a_spilled_cache_read_back_one_context_at_a_time_gives_the_same_results(tmp_path, monkeypatch):
    import mechicl.analysis.engine.slots as slots

    loaded = helpers.tiny_hf("llama")
    b = helpers.batch(loaded, helpers.toy_task(3), "flipped", n_contexts=4, n_examples=7, seed=5)
    masks = head_masks([[(0, 1)], [(1, 2), (0, 3)], []], 2, 4)
    kept, spilled = SlotStepper(loaded.model, b, k_min=3), SlotStepper(loaded.model, b, k_min=3)
    spilled.spill(tmp_path / "kv.bin")
    monkeypatch.setattr(slots, "SPILL_READ_BYTES", 1)  # one context's rows a read
    assert len(slots.surgery.row_ranges(spilled._cache, slots.SPILL_READ_BYTES)) == 4
    for src in (None, kept.z[torch.tensor([3, 0, 1, 2])], kept.z[0, 0]):  # per context, none, one vector per head
        assert torch.allclose(spilled.run(masks, src), kept.run(masks, src), atol=1e-5)
    assert torch.allclose(spilled.run(masks[2:])[0], kept.base_logits, atol=1e-4)  # no intervention = the forward
    monkeypatch.setattr(slots, "ATTRIBUTION_READ_BYTES", 1)  # one context a backward
    p_true = lambda lg, y: lg.softmax(-1).gather(-1, y[..., None])[..., 0]  # noqa: E731
    for src in (None, kept.z[torch.tensor([3, 0, 1, 2])], kept.z[0, 0]):
        assert torch.allclose(spilled.attribution(src, p_true), kept.attribution(src, p_true), atol=1e-5)
