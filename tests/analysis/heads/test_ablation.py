"""The one head ablation: every mode at any tail of readout slots equals plain hooked forwards (one per slot);
the mode set is open; gap reduction's formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechicl.analysis.engine.hooks import run_to_final
from mechicl.analysis.engine.readout import unembed_labels
from mechicl.analysis.heads.ablation import MODES, HeadAblation, derangements, gap_reduction
from mechicl.data.prompts import build_prompt_batch, sample_contexts
from tests import helpers


def _pair(loaded, task, n=4, n_examples=6, seed=0):
    ids = sample_contexts(task, n, n_examples, seed=seed)
    kw = dict(n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    return tuple(build_prompt_batch(task, loaded.tokenizer, ids, c, **kw) for c in ("default", "flipped"))


def _slot_z(loaded, b, head):
    """``head``'s output at every readout slot of every context, from one plain forward: ``[b, ex, d]``."""
    store = {}
    name = f"blocks.{head[0]}.attn.hook_z"
    with torch.no_grad():
        run_to_final(loaded.model, b.tokens, [(name, lambda z, hook: store.__setitem__("z", z.clone()))])
    rows = torch.arange(b.n_contexts)[:, None]
    return store["z"][rows, b.readout_pos, head[1]]


def _replaced_p_true(loaded, b, k_min, head, source):
    """P(true) at every slot ``k >= k_min`` with ``head``'s output at that slot only replaced by ``source[:, k]``
    (``None``: zeros): one plain hooked forward per slot, no KV cache. ``[b, S]``, and whether the last slot's
    prediction is the true label ``[b]``."""
    l, h = head
    rows, out = torch.arange(b.n_contexts), []
    for j in range(k_min, b.n_examples):
        q = b.readout_pos[:, j]

        def patch(z, hook, q=q, j=j):
            z = z.clone()
            z[rows, q, h] = 0.0 if source is None else source[:, j]
            return z

        with torch.no_grad():
            resid = run_to_final(loaded.model, b.tokens, [(f"blocks.{l}.attn.hook_z", patch)])
            logits = unembed_labels(loaded.model, resid[rows, q], b.label_token_ids)
        out.append(torch.softmax(logits.double(), -1).gather(-1, b.true_labels[:, j, None])[:, 0])
    return torch.stack(out, 1).numpy(), (logits.argmax(-1) == b.true_labels[:, -1]).numpy()


def _reference_sources(loaded, correct, flipped, head, mode):
    """Each mode's replacement, built from plain forwards (not from the ablation under test)."""
    zc, zf = _slot_z(loaded, correct, head), _slot_z(loaded, flipped, head)
    if mode == "zero":
        return None, None
    if mode == "mean":
        m = torch.cat([zc, zf]).mean(0, keepdim=True).expand_as(zc)
        return m, m
    if mode == "mean_correct":
        m = zc.mean(0, keepdim=True).expand_as(zc)
        return m, m
    return zf, zc  # "swap": the other rendering's output for the same context (the test's own mode)


def _assert_equals_reference(sc, loaded, pair, k_min, head, sources):
    """One set's per-context ΔP(true), gap closed and flipped accuracy equal one hooked forward per slot with
    ``sources`` (correct, flipped) patched in; the baseline is the unablated run (donor = the context itself)."""
    (correct, flipped), (src_c, src_f) = pair, sources
    none = torch.arange(correct.n_contexts)
    base_c, base_f = (helpers.slot_resample_reference(loaded, b, k_min, head, none).numpy() for b in pair)
    pc, _ = _replaced_p_true(loaded, correct, k_min, head, src_c)
    pf, acc_f = _replaced_p_true(loaded, flipped, k_min, head, src_f)
    np.testing.assert_allclose(sc.d_correct[0], (pc - base_c).mean(1), atol=1e-5)
    np.testing.assert_allclose(sc.d_flipped[0], (pf - base_f).mean(1), atol=1e-5)
    np.testing.assert_allclose(sc.closed[0], ((base_c - base_f) - (pc - pf)).mean(1), atol=1e-5)
    np.testing.assert_array_equal(sc.acc_flipped_last[0], acc_f)
    assert np.abs(sc.d_flipped).max() > 1e-4  # not vacuous


@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("mode", ["mean", "mean_correct", "zero", "swap"])
@pytest.mark.parametrize("k_min", [2, 5])  # slots 2..5, or the query slot alone
def test_every_mode_at_any_slots_equals_hooked_forwards(tiny, model, mode, k_min, monkeypatch):
    """ΔP(true) per context and condition, and the gap closed, equal one hooked forward per slot. "swap" is a mode
    added here, as a later issue will add one: the other condition's output at the same slot of the same context."""
    monkeypatch.setitem(MODES, "swap", lambda abl, c: [abl.z["flipped" if c == "correct" else "correct"]])
    loaded = tiny if model == "tiny" else helpers.tiny_hf("llama")
    correct, flipped = _pair(loaded, helpers.toy_task(3))
    head = (1, 2)
    abl = HeadAblation(loaded.model, correct, flipped, k_min=k_min, mode=mode)
    sc = abl.scores([[head]])
    src_c, src_f = _reference_sources(loaded, correct, flipped, head, mode)
    _assert_equals_reference(sc, loaded, (correct, flipped), k_min, head, (src_c, src_f))


@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
def test_resample_ablation_equals_hooked_forwards(tiny, model):
    """closed / ΔP(true) per context equal a reference built from one hooked forward per slot and donor."""
    loaded = tiny if model == "tiny" else helpers.tiny_hf("llama")
    correct, flipped = _pair(loaded, helpers.toy_task(3))
    abl = HeadAblation(loaded.model, correct, flipped, k_min=2, n_resample=2, seed=5)
    head = (1, 2)
    sc = abl.scores([[head]])
    ref = {}
    for cond, b in (("correct", correct), ("flipped", flipped)):
        base = helpers.slot_resample_reference(loaded, b, 2, head, torch.arange(b.n_contexts))  # donor = itself
        abl_p = np.mean(
            [helpers.slot_resample_reference(loaded, b, 2, head, d).numpy() for d in derangements(4, 2, 5)], 0
        )
        ref[cond] = (base.numpy(), abl_p)
    closed = ((ref["correct"][0] - ref["flipped"][0]) - (ref["correct"][1] - ref["flipped"][1])).mean(1)
    assert np.allclose(sc.closed[0], closed, atol=1e-5)
    assert np.allclose(sc.d_flipped[0], (ref["flipped"][1] - ref["flipped"][0]).mean(1), atol=1e-5)
    assert np.allclose(abl.gap, (ref["correct"][0] - ref["flipped"][0]).mean(1), atol=1e-5)
    assert np.abs(sc.closed).max() > 1e-4  # not vacuous


def test_an_unknown_mode_or_mismatched_renderings_are_refused(tiny):
    correct, flipped = _pair(tiny, helpers.toy_task(3))
    with pytest.raises(ValueError, match="mode must be one of"):
        HeadAblation(tiny.model, correct, flipped, k_min=2, mode="no-such-mode")
    other, _ = _pair(tiny, helpers.toy_task(3), seed=1)
    with pytest.raises(ValueError, match="same contexts"):
        HeadAblation(tiny.model, other, flipped, k_min=2)


def test_derangements_have_no_fixed_point_and_are_seeded():
    a, b = derangements(5, 3, seed=1), derangements(5, 3, seed=1)
    assert all((p != torch.arange(5)).all() for p in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="at least 2 contexts"):
        derangements(1, 1, 0)


def test_gap_reduction_formula():
    assert gap_reduction(0.9, 0.5, 0.9) == pytest.approx(1.0)
    assert gap_reduction(0.9, 0.5, 0.5) == pytest.approx(0.0)
    assert gap_reduction(0.9, 0.5, 0.7) == pytest.approx(0.5)
    assert gap_reduction(0.9, 0.5, 0.3) == pytest.approx(-0.5)
    assert np.isnan(gap_reduction(0.5, 0.5, 0.9)) and np.isnan(gap_reduction(0.4, 0.5, 0.9))
    np.testing.assert_allclose(gap_reduction(1.0, 0.0, np.array([0.0, 0.25, 1.0])), [0.0, 0.25, 1.0])


@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("mode", ["interchange", "mean_condition"])
@pytest.mark.parametrize("k_min", [2, 5])
def test_interchange_and_condition_mean_equal_two_plain_forwards(tiny, model, mode, k_min):
    """``interchange``: the head's ``hook_z`` captured in a plain forward of the *other* rendering and patched in at
    each slot; ``mean_condition``: the same rendering's mean over contexts. Both against one hooked forward per slot."""
    loaded = tiny if model == "tiny" else helpers.tiny_hf("llama")
    correct, flipped = _pair(loaded, helpers.toy_task(3))
    head = (1, 2)
    sc = HeadAblation(loaded.model, correct, flipped, k_min=k_min, mode=mode).scores([[head]])
    zc, zf = _slot_z(loaded, correct, head), _slot_z(loaded, flipped, head)  # [b, ex, d], plain forwards
    if mode == "interchange":
        src_c, src_f = zf, zc
    else:
        src_c, src_f = (z.mean(0, keepdim=True).expand_as(z) for z in (zc, zf))
    _assert_equals_reference(sc, loaded, (correct, flipped), k_min, head, (src_c, src_f))
    assert np.abs(sc.d_correct).max() > 1e-4  # not vacuous in either condition


def test_the_new_modes_differ_from_the_existing_ones(tiny):
    """``mean_condition`` is not ``mean`` / ``mean_correct`` on flipped contexts, and ``interchange`` is not a mean."""
    correct, flipped = _pair(tiny, helpers.toy_task(3))
    abl = {m: HeadAblation(tiny.model, correct, flipped, k_min=2, mode=m) for m in MODES if m != "resample"}
    flip = {m: a.sources("flipped")[0] for m, a in abl.items()}
    assert torch.equal(abl["mean_condition"].sources("correct")[0], abl["mean_correct"].sources("correct")[0])
    for other in ("mean", "mean_correct", "interchange"):
        assert not torch.allclose(flip["mean_condition"], flip[other])
    assert torch.equal(flip["interchange"], abl["interchange"].z["correct"])


def test_the_light_mode_registry_names_every_mode():
    """The CLI's --ablation choices (analysis.heads.modes, no torch) are exactly the modes HeadAblation runs."""
    from mechicl.analysis.heads.ablation import MODES
    from mechicl.analysis.heads.modes import ABLATION_MODES, FINDINGS_DEFAULT

    assert ABLATION_MODES == tuple(MODES) and FINDINGS_DEFAULT in MODES


def test_spilled_steppers_score_exactly_as_resident_ones_and_leave_one_file_per_condition(tmp_path):
    loaded = helpers.tiny_hf("gemma")
    correct, flipped = _pair(loaded, helpers.toy_task(3))
    sets = [[(1, 2)], [(0, 1), (1, 3)]]
    kept = HeadAblation(loaded.model, correct, flipped, k_min=2, mode="interchange")
    spilled = HeadAblation(loaded.model, correct, flipped, k_min=2, mode="interchange", spill=tmp_path)
    assert sorted(p.name.rsplit("-", 1)[1] for p in tmp_path.iterdir()) == ["correct.bin", "flipped.bin"]
    a, b = kept.scores(sets), spilled.scores(sets)
    np.testing.assert_array_equal(a.closed, b.closed)
    np.testing.assert_array_equal(spilled.attribution(), kept.attribution())
