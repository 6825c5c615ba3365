"""Saliency, logit lens and DLA against independent references (TransformerLens caches, full logits)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mechicl.analysis.engine.readout import label_logits
from mechicl.analysis.inside import dla, lens, saliency
from mechicl.data.batches import zero_shot_batch
from tests import helpers


@pytest.fixture(scope="module")
def task3():
    return helpers.toy_task(n_classes=3)


@pytest.fixture(scope="module")
def pair(tiny, task3):
    kw = dict(n_contexts=3, n_examples=6, seed=2)
    return helpers.batch(tiny, task3, "default", **kw), helpers.batch(tiny, task3, "flipped", **kw)


# ---------------------------------------------------------------- saliency ---


def _reference_saliency(loaded, b, row):
    """A * dL/dA per head from TransformerLens's own caching hooks (forward + backward) on the full logits."""
    model = loaded.model
    n = int(b.lengths[row])
    cache = model.add_caching_hooks(names_filter=lambda s: s.endswith("hook_pattern"), incl_bwd=True)
    try:
        logits = model(b.tokens[row : row + 1, :n])[0]  # [pos, vocab]
        q = int(b.readout_pos[row, -1])
        lab = logits[q, b.label_token_ids]
        loss = torch.nn.functional.cross_entropy(lab[None], b.shown_labels[row, -1:])
        loss.backward()
    finally:
        model.reset_hooks()
        model.zero_grad(set_to_none=True)
    L = model.cfg.n_layers
    return torch.stack(
        [cache[f"blocks.{l}.attn.hook_pattern"][0] * cache[f"blocks.{l}.attn.hook_pattern_grad"][0] for l in range(L)]
    )  # [L, H, q, k]


def test_saliency_matches_backward_hook_reference(tiny, pair):
    b = pair[1]
    sal = saliency.attention_saliency(tiny.model, [b], "last", batch_size=2, progress=False)
    L, H = tiny.model.cfg.n_layers, tiny.model.cfg.n_heads
    s_wp, s_pq, s_ww, head = np.zeros(L), np.zeros(L), np.zeros(L), np.zeros((L, H))
    for row in range(b.n_contexts):
        ref = _reference_saliency(tiny, b, row)
        I = ref.sum(1).abs()  # [L, q, k]: Wang et al.'s I_l
        q = int(b.readout_pos[row, -1])
        labels = b.label_pos[row, :-1].tolist()
        wp, pq, ww = [], [], []
        for i in range(q + 1):
            for j in range(i):
                (pq if (i == q and j in labels) else wp if i in labels else ww).append((i, j))
        for _name, pairs, acc in (("wp", wp, s_wp), ("pq", pq, s_pq), ("ww", ww, s_ww)):
            acc += np.array([np.mean([float(I[l, i, j]) for i, j in pairs]) for l in range(L)]) / b.n_contexts
        head += (
            np.array([[np.mean([abs(float(ref[l, h, i, j])) for i, j in pq]) for h in range(H)] for l in range(L)])
            / b.n_contexts
        )
    lay = sal.layers.sort_values("layer")
    np.testing.assert_allclose(lay.S_wp, s_wp, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(lay.S_pq, s_pq, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(lay.S_ww, s_ww, rtol=1e-4, atol=1e-9)
    got = sal.heads.sort_values(["layer", "head"]).saliency.to_numpy().reshape(L, H)
    np.testing.assert_allclose(got, head, rtol=1e-4, atol=1e-9)
    assert s_pq.sum() > 0


def test_saliency_pair_masks_are_disjoint(pair):
    for queries in ("last", "all"):
        m = saliency.saliency_pair_masks(pair[0], queries, k_min=2)
        total = m["wp"] + m["pq"] + m["ww"]
        assert total.max() == 1.0
        assert (torch.triu(total.sum(0)) == 0).all(), "only pairs j < i"
    m = saliency.saliency_pair_masks(pair[0], "last")
    assert torch.equal(m["pq"].sum((-1, -2)), torch.full((3,), 5.0))  # the 5 earlier labels


# -------------------------------------------------------------- logit lens ---


def test_lens_last_depth_equals_model_logits(tiny, pair):
    b = pair[0]
    lg = lens.lens_logits(tiny.model, b, batch_size=2, progress=False)  # [b, ex, depth, labels]
    assert lg.shape[2] == tiny.model.cfg.n_layers + 1
    torch.testing.assert_close(lg[:, :, -1], helpers.full_label_logits(tiny, b), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(lg[:, :, 0], lg[:, :, -1])


def test_lens_metrics_and_critical_depth_on_synthetic_logits(pair):
    bd, bf = pair
    n, k = bd.label_pos.shape
    # depth 0: both follow the true label; depth 1: flipped contexts follow the shown (wrong) label
    eye = torch.eye(3) * 5
    lg_d = torch.stack([eye[bd.true_labels], eye[bd.true_labels]], 2)
    lg_f = torch.stack([eye[bf.true_labels], eye[bf.shown_labels]], 2)
    raw = pd.concat([lens.lens_metrics(lg_d, bd), lens.lens_metrics(lg_f, bf)])
    acc = raw[raw.metric == "accuracy_true"].groupby(["condition", "depth"]).value.mean()
    assert acc[("default", 1)] == 1.0 and acc[("flipped", 1)] == 0.0 and acc[("flipped", 0)] == 1.0
    gap = pd.DataFrame(
        {
            "depth": [0, 1, 2],
            "metric": "accuracy_true",
            "mean": [0.0, 0.3, 0.5],
            "ci_low": [-0.1, 0.1, 0.2],
            "ci_high": [0.1, 0.5, 0.8],
        }
    )
    assert lens.critical_depth(gap, 0.05) == 1
    assert lens.critical_depth(gap, 0.4) == 2
    assert lens.critical_depth(gap.assign(ci_low=-1.0), 0.05) is None


# ---------------------------------------------------------------------- DLA ---


def test_dla_sums_to_model_logits(tiny, pair):
    for b in pair:
        dl = dla.direct_logits(tiny.model, b, batch_size=2, progress=False)
        torch.testing.assert_close(dl.logits, helpers.full_label_logits(tiny, b).double(), atol=1e-4, rtol=1e-4)
        assert (dl.contrib.sum(0) - dl.logits).abs().max() < 1e-4
        for tgt in (b.shown_labels, (b.shown_labels + 1) % 3):
            assert (dl.margin(tgt).sum(0) - dla.margin(dl.logits, tgt)).abs().max() < 1e-4
        assert len(dl.names) == 2 + 2 * (4 + 1 + 1) + 1  # embed, pos_embed, per layer 4 heads + b_O + mlp, bias


def test_dla_heads_match_transformer_lens_cache(tiny, pair):
    """Per-head DLA equals TransformerLens's stack_head_results + apply_ln_to_stack, times the final LN
    weight and the unembedding (the bridge does not fold LN weights into W_U)."""
    b = pair[0]
    dl = dla.direct_logits(tiny.model, b, batch_size=3, progress=False)
    model = tiny.model
    W = model.ln_final.weight.detach()
    for row in range(b.n_contexts):
        n = int(b.lengths[row])
        with torch.no_grad():
            _, cache = model.run_with_cache(b.tokens[row : row + 1, :n])
            stack = cache.stack_head_results(layer=-1, apply_ln=True)  # [L*H, 1, pos, d_model]
            resid, labels = cache.decompose_resid(layer=-1, apply_ln=True, return_labels=True)
        pos = b.readout_pos[row]
        ref = (stack[:, 0, pos] * W) @ model.W_U[:, b.label_token_ids].detach()  # [L*H, ex, n_labels]
        heads = [i for i, h in enumerate(dl.head) if h >= 0]
        torch.testing.assert_close(dl.contrib[heads, row].float(), ref, atol=2e-5, rtol=1e-4)
        mlp = [i for i, nm in enumerate(dl.names) if nm.endswith(".mlp")]
        ref_mlp = (resid[[labels.index(f"{l}_mlp_out") for l in range(2)], 0][:, pos] * W) @ model.W_U[
            :, b.label_token_ids
        ].detach()
        torch.testing.assert_close(dl.contrib[mlp, row].float(), ref_mlp, atol=2e-5, rtol=1e-4)


def test_zero_shot_prior_is_the_k0_prediction(tiny, task3, pair):
    bd = pair[0]
    zb = zero_shot_batch(task3, tiny.tokenizer, bd, n_ctx=tiny.n_ctx, prepend_bos=tiny.prepend_bos)
    assert zb.n_examples == 1 and zb.n_contexts == bd.n_contexts * bd.n_examples
    prior = dla.zero_shot_prior(tiny.model, zb, tuple(bd.example_ids.shape), progress=False)
    # example 0 of each context has no demonstrations: its prediction is the prior of its input
    k0 = label_logits(tiny.model, bd, progress=False)[:, 0].argmax(-1)
    assert torch.equal(prior[:, 0], k0)


def _fake(contrib, cond):
    c = contrib.shape[0]
    return dla.DirectLogits(
        contrib.double(), contrib.sum(0).double(), tuple(f"L0H{i}" for i in range(c)), (0,) * c, tuple(range(c)), cond
    )


def test_prior_vs_context_separates_followers(tiny):
    """A component that pushes the shown label is all context; one that pushes the prior is all prior."""
    task = helpers.toy_task()  # binary
    bd = helpers.batch(tiny, task, "default", n_contexts=4, n_examples=5, seed=4)
    bf = helpers.batch(tiny, task, "flipped", n_contexts=4, n_examples=5, seed=4)
    prior = torch.randint(0, 2, bd.true_labels.shape, generator=torch.Generator().manual_seed(0))
    prior[:, 1:4] = 1  # unbalanced priors
    onehot = lambda y: torch.nn.functional.one_hot(y, 2).double()  # noqa: E731
    const = onehot(torch.zeros_like(prior))  # pushes label 0 everywhere
    mk = lambda shown: torch.stack(
        [
            onehot(shown),
            onehot(prior),
            0.5 * onehot(shown) + 2 * onehot(prior),
            3 * const,  # noqa: E731
            onehot(shown) + const,
        ]
    )
    tab = dla.prior_vs_context(
        _fake(mk(bd.shown_labels), "default"), _fake(mk(bf.shown_labels), "flipped"), bd, bf, prior, k_min=1
    )
    np.testing.assert_allclose(tab.context, [1.0, 0.0, 0.5, 0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(tab.prior, [0.0, 1.0, 2.0, 0.0, 0.0], atol=1e-12)
    assert tab.dla_prior_default[3] != 0  # the plain mean does see the constant push (unbalanced priors)
    np.testing.assert_allclose(tab.side, tab.context - tab.prior)
    with pytest.raises(ValueError, match="same example ids"):
        other = helpers.batch(tiny, task, "flipped", n_contexts=4, n_examples=5, seed=5)
        dla.prior_vs_context(
            _fake(mk(bd.shown_labels), "default"), _fake(mk(bd.shown_labels), "flipped"), bd, other, prior
        )


# ------------------------------------------------------------ real model ---


@pytest.mark.real_model
def test_real_model_dla_and_lens(real):
    """Gemma-3 (RMSNorm, post-attention norms): DLA sums to the logits; lens' last depth = model logits."""
    from mechicl.data.tasks import load_task

    task = load_task("vader-words")
    b = helpers.batch(real, task, "flipped", n_contexts=2, n_examples=5)
    dl = dla.direct_logits(real.model, b, batch_size=2, progress=False)
    ref = helpers.full_label_logits(real, b).double()
    torch.testing.assert_close(dl.logits, ref, atol=2e-3, rtol=1e-4)
    assert (dl.contrib.sum(0) - dl.logits).abs().max() < 1e-4
    assert (dl.margin(b.shown_labels).sum(0) - dla.margin(dl.logits, b.shown_labels)).abs().max() < 1e-4
    lg = lens.lens_logits(real.model, b, batch_size=2, progress=False)
    torch.testing.assert_close(lg[:, :, -1].double(), ref, atol=2e-3, rtol=1e-4)
