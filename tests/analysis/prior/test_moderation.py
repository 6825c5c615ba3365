"""Prior strength against full logits at k = 0, and the moderation table against a plain loop of hooked forwards
(one per slot, the head's output swapped between the conditions), bin by bin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.analysis.heads.ablation import HeadAblation
from mechicl.analysis.prior.moderation import moderation, prior_strength
from mechicl.data.batches import zero_shot_batch
from mechicl.data.prompts import build_prompt_batch, sample_contexts
from tests import helpers
from tests.analysis.heads.test_ablation import _replaced_p_true, _slot_z


@pytest.fixture(scope="module")
def setup(tiny):
    task = helpers.toy_task(2)
    ids = sample_contexts(task, 6, 6, seed=2)
    kw = dict(n_ctx=tiny.n_ctx, prepend_bos=tiny.prepend_bos)
    pair = [build_prompt_batch(task, tiny.tokenizer, ids, c, **kw) for c in ("default", "flipped")]
    zs = zero_shot_batch(task, tiny.tokenizer, pair[0], **kw)
    return task, pair, zs


def test_prior_strength_equals_full_logits_at_k0(tiny, setup):
    _, _, zs = setup
    got = prior_strength(ReadoutStepper(tiny.model, zs))
    with torch.no_grad():
        logits = tiny.model(zs.tokens)
    rows = torch.arange(zs.n_contexts)
    at = logits[rows, zs.readout_pos[:, -1]][:, zs.label_token_ids].double().log_softmax(-1)
    y = zs.true_labels[:, -1]
    ref = at[rows, y] - at[rows, 1 - y]  # two classes: the other one
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)


def test_moderation_equals_a_loop_of_hooked_forwards(tiny, setup):
    _, (correct, flipped), zs = setup
    k_min, head = 2, (1, 1)
    prior = prior_strength(ReadoutStepper(tiny.model, zs)).reshape(correct.example_ids.shape)[:, k_min:]
    abl = HeadAblation(tiny.model, correct, flipped, k_min, mode="zero")
    edges = (-np.inf, float(np.median(prior)), np.inf)
    tab = moderation(abl, [[head]], prior, bins=edges, k_groups=[(k_min, 5)], n_boot=200)
    none = torch.arange(correct.n_contexts)
    base_c, base_f = (helpers.slot_resample_reference(tiny, b, k_min, head, none).numpy() for b in (correct, flipped))
    zc, zf = _slot_z(tiny, correct, head), _slot_z(tiny, flipped, head)
    pc, _ = _replaced_p_true(tiny, correct, k_min, head, zf)  # interchange: the other rendering's output
    pf, _ = _replaced_p_true(tiny, flipped, k_min, head, zc)
    closed = (pf - base_f) - (pc - base_c)  # [b, S]
    which = prior >= edges[1]
    assert tab.n_slots.sum() == prior.size and len(tab) == 2
    for j, row in enumerate(tab.itertuples()):
        mask = which == bool(j)
        assert row.closed == pytest.approx(closed[mask].mean(), abs=1e-5)
        assert row.p_flipped == pytest.approx(base_f[mask].mean(), abs=1e-5)
        assert row.closed_ci_low <= row.closed <= row.closed_ci_high
    assert np.abs(closed).max() > 1e-4  # not vacuous
    with pytest.raises(ValueError, match="prior must be"):
        moderation(abl, [[head]], prior[:, :1])
