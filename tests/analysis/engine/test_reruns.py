"""The re-run engine's shared pieces: the padding rule (against unpadded HF forwards), the self-check's tolerance
rule, and the one fallback path that the readout stepper, the slot stepper and prefix reuse all take."""

from __future__ import annotations

import warnings

import pytest
import torch

from mechicl.analysis.engine import reruns
from mechicl.analysis.engine.hooks import head_masks, run_to_final
from mechicl.analysis.engine.prefix_reuse import SuffixRunner
from mechicl.analysis.engine.reruns import NoKVPath, check_rerun, kv_or_full, left_pad
from mechicl.analysis.engine.slots import SlotStepper
from mechicl.analysis.engine.stepper import ReadoutStepper
from tests import helpers


def test_left_padding_gives_each_row_its_unpadded_forward_in_the_last_column(toy):
    loaded = helpers.tiny_hf("gemma3", sliding_window=8)  # rows longer than the window: HF applies it per row
    b = helpers.batch(loaded, toy, "flipped", n_contexts=3, n_examples=5, seed=1)
    q = b.readout_pos[:, -1]
    lay = left_pad(b.tokens, q)
    assert lay.width == int(q.max()) + 1 and torch.equal(lay.offset, lay.width - 1 - q)
    with torch.no_grad():
        padded = run_to_final(loaded.model, lay.tokens, attention_mask=lay.mask, position_ids=lay.pos)[:, -1]
        for r in range(b.n_contexts):
            alone = run_to_final(loaded.model, b.tokens[r : r + 1, : int(q[r]) + 1])[0, -1]
            assert torch.allclose(padded[r], alone, atol=1e-5), r
    assert int(lay.mask.sum()) == int((q + 1).sum())


def test_the_self_check_tolerance_scales_with_dtype_and_logit_size():
    f32 = torch.nn.Linear(2, 2)  # the rule reads only the model's parameter dtype
    want = torch.tensor([0.5, -1.0])
    check_rerun("x", want + 9e-4, want, f32)  # within atol = 1e-3
    with pytest.raises(NoKVPath, match="x differs from the full forward by 0.002"):
        check_rerun("x", want + 2e-3, want, f32)
    check_rerun("x", 100 * want + 0.09, 100 * want, f32)  # relative to max(1, max |want|) = 100
    bf16 = torch.nn.Linear(2, 2).to(torch.bfloat16)
    check_rerun("x", want + 0.015, want, bf16)  # 2 eps(bfloat16) = 0.0156 > atol
    with pytest.raises(NoKVPath):
        check_rerun("x", want + 0.02, want, bf16)


def test_one_fallback_path():
    calls = []
    assert not kv_or_full("X", "full", lambda: calls.append(1)) and not calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model's nature: quiet
        assert not kv_or_full("X", "auto", lambda: (_ for _ in ()).throw(NoKVPath("no cache", expected=True)))
    with pytest.warns(UserWarning, match="X: KV path unavailable .*boom.*using full forwards"):
        assert not kv_or_full("X", "auto", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        kv_or_full("X", "kv", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert kv_or_full("X", "kv", lambda: None)
    with pytest.raises(ValueError, match="mode must be one of"):
        kv_or_full("X", "fast", lambda: None)


_COPIES_MASK = reruns.copies_mask


def _blind(model, prefix_ok, q_pos, k_pos):
    """A broken step mask: appended copies do not see the cached prefix (only themselves)."""
    return _COPIES_MASK(model, torch.zeros_like(prefix_ok), q_pos, k_pos)


def test_a_failed_self_check_falls_back_to_full_forwards_in_both_steppers(toy, monkeypatch):
    loaded = helpers.tiny_hf("llama")
    b = helpers.batch(loaded, toy, "flipped", n_contexts=3, n_examples=5, seed=2)
    masks = head_masks([[(0, 1)], [(1, 2), (0, 3)]], 2, 4)
    good = {"readout": ReadoutStepper(loaded.model, b), "slots": SlotStepper(loaded.model, b, k_min=2)}
    assert {s.mode for s in good.values()} == {"kv"}
    good = {name: st.run(masks) for name, st in good.items()}  # before the masks break
    monkeypatch.setattr(reruns, "copies_mask", _blind)  # both steppers build their step masks with it
    for name, make in (
        ("readout", lambda **kw: ReadoutStepper(loaded.model, b, **kw)),
        ("slots", lambda **kw: SlotStepper(loaded.model, b, 2, **kw)),
    ):
        with pytest.warns(UserWarning, match="differs from the full forward"):
            st = make()
        assert st.mode == "full" and (st.n_layers, st.n_heads) == (2, 4)
        ref = make(mode="full")
        assert torch.equal(st.run(masks), ref.run(masks))  # the fallback is exactly the full-forward stepper
        assert torch.allclose(st.run(masks), good[name], atol=1e-4)  # and equals the working KV path
        with pytest.raises(NoKVPath, match="differs from the full forward"):
            make(mode="kv")


def test_models_without_a_cache_take_the_full_path_quietly(tiny, toy):
    b = helpers.batch(tiny, toy, n_contexts=2, n_examples=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ReadoutStepper(tiny.model, b).mode == "full" and SlotStepper(tiny.model, b, 1).mode == "full"
    for build in (
        lambda: SuffixRunner(tiny.model, b.tokens[:, :3], 8),
        lambda: ReadoutStepper(tiny.model, b, mode="kv"),
    ):
        with pytest.raises(NoKVPath) as e:
            build()
        assert e.value.expected


def test_length_chunks_sort_by_length_and_keep_each_chunk_within_its_token_budget():
    from mechicl.analysis.engine.reruns import length_chunks

    last = torch.tensor([9, 2, 5, 2, 30, 7])
    chunks = length_chunks(last, tokens=16)
    assert sorted(torch.cat(chunks).tolist()) == list(range(6))  # every row once
    lengths = [last[c] + 1 for c in chunks]
    assert [c.tolist() for c in chunks] == [[1, 3], [2, 5], [0], [4]]  # sorted by length (stable); 3 x 6 > 16
    assert all(len(n) * int(n.max()) <= 16 or len(n) == 1 for n in lengths)  # a row longer than the budget is alone


def _chunk_cost(chunks, low, L, fixed):
    """Blocks re-run, in token rows per intervention: each chunk from its own lowest layer."""
    return sum((len(c) + fixed) * (L - min(low[i] for i in c)) for c in chunks)


def test_layer_chunks_cover_every_intervention_once_and_cost_the_brute_force_minimum():
    import itertools

    from mechicl.analysis.engine.reruns import layer_chunks

    L, H, per, rows, call_rows = 6, 2, 3, 4, 8
    sets = [[(5, 0)], [(0, 1)], [(3, 0)], [], [(1, 1), (4, 0)], [(0, 0)], [(3, 1)], [(2, 0)]]
    masks = head_masks(sets, L, H)
    low = [min((l for l, _ in s), default=L - 1) for s in sets]
    chunks = [c.tolist() for c in layer_chunks(masks, per, rows=rows, call_rows=call_rows)]
    assert sorted(i for c in chunks for i in c) == list(range(len(sets)))
    assert all(1 <= len(c) <= per for c in chunks)
    fixed = call_rows / rows
    got = _chunk_cost(chunks, low, L, fixed)
    # brute force: every partition of the interventions, sorted by layer, into runs of at most ``per``
    order = sorted(range(len(sets)), key=lambda i: low[i])
    best = min(
        _chunk_cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], low, L, fixed)
        for r in range(len(order))
        for cuts in itertools.combinations(range(1, len(order)), r)
        if all(b - a <= per for a, b in zip((0, *cuts), (*cuts, len(order))))
    )
    assert got == pytest.approx(best)
    naive = [list(range(i, min(len(sets), i + per))) for i in range(0, len(sets), per)]  # slices in the order given
    assert got < _chunk_cost(naive, low, L, fixed)
    assert layer_chunks(masks[:0], per) == []


def test_interventions_in_any_order_give_the_same_results_in_both_steppers():
    loaded = helpers.tiny_hf("llama")
    b = helpers.batch(loaded, helpers.toy_task(), "default", n_contexts=4, n_examples=6)
    masks = head_masks([[(l, h)] for l in range(2) for h in range(4)] + [[], [(0, 2), (1, 1)]], 2, 4)
    perm = torch.randperm(len(masks), generator=torch.Generator().manual_seed(0))
    for st in (SlotStepper(loaded.model, b, k_min=2, step_tokens=24), ReadoutStepper(loaded.model, b, step_tokens=12)):
        donor = st.z[torch.tensor([1, 2, 3, 0])]
        got, ref = st.run(masks[perm], donor), st.run(masks, donor)[perm]
        assert torch.allclose(got, ref, atol=1e-5), type(st).__name__
        ones = torch.stack([st.run(m[None], donor)[0] for m in masks])  # one intervention a call: no grouping at all
        assert torch.allclose(st.run(masks, donor), ones, atol=1e-5), type(st).__name__


def test_cheapest_runs_past_its_step_budget_cuts_plain_runs_in_the_sorted_order(monkeypatch):
    monkeypatch.setattr(reruns, "DP_STEPS", 10)
    assert reruns.cheapest_runs(7, 3, lambda j, size: 1.0) == [(0, 3), (3, 6), (6, 7)]
    monkeypatch.setattr(reruns, "DP_STEPS", 10**6)
    assert reruns.cheapest_runs(7, 3, lambda j, size: 1.0) == [
        (0, 1),
        (1, 4),
        (4, 7),
    ]  # the DP: 3 runs too, cut elsewhere
