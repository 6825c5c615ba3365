"""Prefix reuse: head-output sweeps that re-run only the positions after the first differing label equal
TransformerLens's full sweep, on last-m and all-flipped pairs; where the prefix cannot be reused the
Patcher says so (or, on TL-native models, quietly) and runs full width."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformer_lens.patching as tlp

from mechicl.analysis.engine.hooks import run_to_final
from mechicl.analysis.engine.prefix_reuse import SuffixRunner, shared_prefix, suffix_groups
from mechicl.analysis.engine.reruns import NoKVPath
from mechicl.analysis.patching.exact import Patcher
from mechicl.data.pairs import pair_for
from mechicl.data.tasks import load_task
from tests import helpers


def tl_head_out(loaded, pair, direction):
    """TL's all-positions head-output sweep with the same normalised metric (baselines from full forwards)."""
    metric = helpers.tl_metric(loaded, pair)
    recv, donor = (pair.corrupted, pair.clean) if direction == "denoise" else (pair.clean, pair.corrupted)
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(donor.tokens)
        return tlp.get_act_patch_attn_head_out_all_pos(loaded.model, recv.tokens, cache, metric)


def first_flipped_label(pair, last_m):
    """The earliest position (over contexts) of a flipped demonstration label, from the label positions."""
    n_ex = pair.clean.n_examples
    j = 0 if last_m is None else n_ex - 1 - last_m
    return int(pair.clean.label_pos[:, j].min())


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("last_m", [2, None], ids=["last2", "all-flipped"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_head_out_with_a_reused_prefix_equals_transformer_lens(toy, arch, last_m, direction):
    loaded = helpers.tiny_hf(arch)
    pair = pair_for(loaded, toy, 3, 6, last_m=last_m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the KV path must be taken, not fallen back from
        patcher = Patcher(loaded.model, pair, max_rows=8)
        ours = patcher.sweep("head_out", direction)
    runner = patcher.suffix_runner("corrupted" if direction == "denoise" else "clean")
    assert runner is not None and runner.start == first_flipped_label(pair, last_m)
    ref = tl_head_out(loaded, pair, direction)
    helpers.assert_patch_close(ours, ref)  # in logits of raw LD: the normalised scale can be ill-conditioned
    full = Patcher(loaded.model, pair, prefix_reuse=False).sweep("head_out", direction)
    helpers.assert_patch_close(ours, full.values, atol=1e-5)
    assert ours.values.abs().max() > 0.05  # not vacuous: heads move the metric
    if last_m is not None:  # most of the prompt is the reused prefix: fewer forward equivalents despite the prefix run
        assert runner.fraction < 0.5 and ours.forwards < full.forwards


@pytest.mark.parametrize("last_m", [2, 4])
def test_contexts_past_a_sliding_window_reuse_the_prefix_and_equal_transformer_lens(toy, last_m):
    """Tiny Gemma-3 layout with an 8-token window: contexts of ~40 tokens, a prefix far longer than the window."""
    short = helpers.tiny_hf("gemma3", sliding_window=8)
    pair = pair_for(short, toy, 3, 8, last_m=last_m)
    width = int(pair.query_pos.max()) + 1
    assert shared_prefix(pair, width) > 8 and width > 16  # both the prefix and the suffix span more than a window
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the KV path must be taken, not fallen back from
        patcher = Patcher(short.model, pair)
        ours = patcher.sweep("head_out")
    assert patcher.suffix_runner("corrupted") is not None
    assert isinstance(patcher.suffix_runner("corrupted")._mask, dict)  # full and sliding layers get their own mask
    ref = tl_head_out(short, pair, "denoise")
    helpers.assert_patch_close(ours, ref)
    assert ours.values.abs().max() > 0.05


def test_suffix_runner_equals_the_full_forward_and_copies_are_independent(toy):
    loaded = helpers.tiny_hf("llama")
    pair = pair_for(loaded, toy, 2, 5, last_m=2)
    width = int(pair.query_pos.max()) + 1
    p0 = shared_prefix(pair, width)
    tokens = pair.corrupted.tokens[:, :width]
    runner = SuffixRunner(loaded.model, pair.clean.tokens[:, :p0], width)
    with torch.no_grad():
        full = run_to_final(loaded.model, tokens)[:, p0:]
    out = runner.run(tokens[:, p0:], 3)
    assert out.shape == (6, width - p0, full.shape[-1])
    assert torch.allclose(out, full.repeat(3, 1, 1), atol=1e-5)

    def zero_copy_1(z, hook):  # rows copy * batch + context: zero copy 1's head 0 at layer 1
        z = z.clone()
        z[2:4, :, 0] = 0
        return z

    hooked = runner.run(tokens[:, p0:], 3, [("blocks.1.attn.hook_z", zero_copy_1)])
    assert torch.allclose(hooked[[0, 1, 4, 5]], out[[0, 1, 4, 5]], atol=1e-6)
    assert not torch.allclose(hooked[2:4], out[2:4], atol=1e-3)
    with pytest.raises(ValueError, match="suffix has"):
        runner.run(tokens[:, p0 + 1 :])


def test_without_a_usable_kv_path_the_sweep_runs_full_width(tiny, toy, monkeypatch):
    pair = pair_for(tiny, toy, 3, 5, last_m=2)  # TL-native: no KV cache, quietly full width
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patcher = Patcher(tiny.model, pair)
        ours = patcher.sweep("head_out")
    assert patcher.suffix_runner("corrupted") is None
    helpers.assert_patch_close(ours, tl_head_out(tiny, pair, "denoise"))
    with pytest.raises(NoKVPath) as e:
        SuffixRunner(tiny.model, pair.clean.tokens[:, :5], 20)
    assert e.value.expected

    loaded = helpers.tiny_hf("llama")  # a re-run that disagrees with the full forward is caught, not used
    pair = pair_for(loaded, toy, 3, 5, last_m=2)
    broken = SuffixRunner.run
    monkeypatch.setattr(SuffixRunner, "run", lambda self, *a, **k: broken(self, *a, **k).flip(1))  # positions reversed
    patcher = Patcher(loaded.model, pair)
    with pytest.warns(UserWarning, match="differs from the full forward"):
        ours = patcher.sweep("head_out")
    assert not patcher.prefix_reuse
    helpers.assert_patch_close(ours, tl_head_out(loaded, pair, "denoise"))


@pytest.mark.real_model
def test_prefix_reuse_on_real_equals_transformer_lens(real):
    pair = pair_for(real, load_task("vader-words"), 2, 4, last_m=2)
    patcher = Patcher(real.model, pair)
    ours = patcher.sweep("head_out", "denoise")
    assert patcher.suffix_runner("corrupted") is not None
    ref = helpers.tl_head_out_at(real, pair, "denoise")  # every head of 3 layers (the full sweep: tiny models)
    helpers.assert_patch_close(ours, ref, layers=helpers.REAL_LAYERS)


# ------------------------------------------- sweeps by position: re-run from the patched position ---


def tl_by_position(loaded, pair, kind, direction):
    """TL's own (layer, position) sweep of ``kind`` with the same normalised metric (``test_exact.TL_SWEEPS``)."""
    fn = {
        "resid": tlp.get_act_patch_resid_pre,
        "attn_out": tlp.get_act_patch_attn_out,
        "mlp_out": tlp.get_act_patch_mlp_out,
    }
    metric = helpers.tl_metric(loaded, pair)
    recv, donor = (pair.corrupted, pair.clean) if direction == "denoise" else (pair.clean, pair.corrupted)
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(donor.tokens)
        return fn[kind](loaded.model, recv.tokens, cache, metric)


@pytest.mark.parametrize(
    "kind,direction,arch",
    [
        ("resid", "denoise", "llama"),
        ("attn_out", "noise", "llama"),
        ("mlp_out", "denoise", "gemma3"),
        ("resid", "noise", "gemma3"),
    ],
)
def test_position_sweeps_rerun_from_the_patched_position_and_equal_transformer_lens(toy, kind, direction, arch):
    loaded = helpers.tiny_hf(arch)
    pair = pair_for(loaded, toy, 3, 6, last_m=3)
    recv = "corrupted" if direction == "denoise" else "clean"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the KV path must be taken, not fallen back from
        patcher = Patcher(loaded.model, pair, max_rows=9)  # 3 cells per call: several groups per layer
        ours = patcher.sweep(kind, direction)
    runner = patcher.suffix_runner(recv, whole=True)
    assert runner is not None and runner.start == patcher.width - 1
    ref = tl_by_position(loaded, pair, kind, direction)[:, : patcher.width]
    helpers.assert_patch_close(ours, ref)
    full = Patcher(loaded.model, pair, prefix_reuse=False).sweep(kind, direction)
    helpers.assert_patch_close(ours, full.values, atol=1e-5)
    assert torch.equal(ours.computed, full.computed)
    late = ours.computed.clone()  # not vacuous: cells after the first differing label move the metric
    late[:, : shared_prefix(pair, patcher.width) + 1] = False
    assert (ours.effect[late].abs() > 1e-3).sum() >= 3
    assert ours.forwards < 0.75 * full.forwards  # later cells re-run fewer positions


def test_suffix_runner_reruns_from_any_cached_position(toy):
    """A runner over a run's own positions re-runs from any ``s`` over views of its first ``s`` cached positions:
    equal to the full forward there, and a patch at ``s`` equals the same patch in a full-width forward."""
    loaded = helpers.tiny_hf("gemma3", sliding_window=4)  # positions past the window: its mask matters
    pair = pair_for(loaded, toy, 2, 4)
    width = int(pair.query_pos.max()) + 1
    tokens = pair.corrupted.tokens[:, :width]
    runner = SuffixRunner(loaded.model, tokens[:, : width - 1], width)
    with torch.no_grad():
        full = run_to_final(loaded.model, tokens)
    for s in (1, 5, width // 2, width - 1):
        assert torch.allclose(runner.run(tokens[:, s:], start=s), full[:, s:], atol=1e-5), s

        def bump(x, hook, at=0):  # a patch at the suffix's first position (position s of the context)
            x = x.clone()
            x[:, at] += 1.0
            return x

        name = "blocks.1.hook_resid_pre"
        want = run_to_final(loaded.model, tokens, [(name, lambda x, hook, s=s: bump(x, hook, s))])[:, s:]
        got = runner.run(tokens[:, s:], 2, [(name, bump)], start=s)
        assert torch.allclose(got, want.repeat(2, 1, 1), atol=1e-5), s
        assert not torch.allclose(got[:, -1], full[:, -1].repeat(2, 1), atol=1e-3)  # the patch reaches the end
    with pytest.raises(ValueError, match="start must be"):
        runner.run(tokens, start=0)


def test_suffix_groups_minimise_rerun_tokens_plus_calls():
    assert suffix_groups([5, 6, 7], 10, 1, per=8, call_cost=0) == [[5], [6], [7]]  # no call cost: one call per cell
    assert suffix_groups([7, 5, 6], 10, 1, per=8, call_cost=1e9) == [[5, 6, 7]]  # calls dear: one call
    # three calls (at most 4 cells each); of those, the fewest re-run tokens: 3 x 10 + 3 x 7 + 4 x 4
    assert suffix_groups(range(10), 10, 1, per=4, call_cost=1e9) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert suffix_groups([], 10, 4, per=4) == []


@pytest.mark.parametrize("kind", ["resid", "attn_out"])
def test_position_sweeps_past_a_sliding_window_equal_transformer_lens(toy, kind):
    """Tiny Gemma-3 layout with an 8-token window: cells far past the window re-run over a cache longer than it."""
    short = helpers.tiny_hf("gemma3", sliding_window=8)
    pair = pair_for(short, toy, 2, 8, last_m=2)
    width = int(pair.query_pos.max()) + 1
    assert shared_prefix(pair, width) > 16 and width > 24
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patcher = Patcher(short.model, pair)
        ours = patcher.sweep(kind)
    assert isinstance(patcher.suffix_runner("corrupted", whole=True)._mask, dict)  # sliding layers masked apart
    helpers.assert_patch_close(ours, tl_by_position(short, pair, kind, "denoise")[:, :width])
    assert ours.effect.abs().max() > 0.05
