"""Steering equals a brute-force reference: plain TL ``run_with_hooks`` adding the vector at the head's ``hook_z``
at the query readout slot, full forwards with the unembedding, one context and one alpha at a time."""

from __future__ import annotations

import pytest
import torch

from mechicl.analysis.aggregation.steering import mean_difference, steer, steering_tables
from mechicl.data.prompts import build_prompt_batch, sample_contexts
from tests import helpers


def _reference(loaded, b, head, v, alpha):  # v: [d_head], or [n_labels, d_head] indexed by the query's class
    l, h = head
    out = []
    for c in range(b.n_contexts):
        n = int(b.lengths[c])
        q = int(b.readout_pos[c, -1])

        def add(z, hook):
            z = z.clone()
            z[0, q, h] += alpha * (v if v.dim() == 1 else v[int(b.true_labels[c, -1])])
            return z

        with torch.no_grad():
            logits = loaded.model.run_with_hooks(b.tokens[c : c + 1, :n], fwd_hooks=[(f"blocks.{l}.attn.hook_z", add)])
        lab = logits[0, q, b.label_token_ids].double()
        out.append(torch.softmax(lab, -1)[(int(b.true_labels[c, -1]) + 1) % 2])
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["tiny", "gemma"])
def test_steering_equals_plain_hooks(arch, tiny, toy):
    loaded = tiny if arch == "tiny" else helpers.tiny_hf("gemma")
    ids = sample_contexts(toy, 3, 5, seed=2)
    for c in (0, 1):  # queries of both classes
        ids[c, -1] = next(i for i in range(len(toy)) if toy.labels[i] == c and i not in ids[c, :-1].tolist())
    kw = dict(n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    default = build_prompt_batch(toy, loaded.tokenizer, ids, "default", **kw)
    flipped = build_prompt_batch(toy, loaded.tokenizer, ids, "flipped", **kw)
    heads = [(1, 1), (0, 3)]
    vec = mean_difference(loaded.model, default, flipped, heads, batch_size=2)
    # reference vector: hook_z from run_with_cache, context by context
    for i, (l, h) in enumerate(heads):
        diffs = []
        for c in range(3):
            zs = []
            for b in (default, flipped):
                n, q = int(b.lengths[c]), int(b.readout_pos[c, -1])
                _, cache = loaded.model.run_with_cache(b.tokens[c : c + 1, :n])
                zs.append(cache[f"blocks.{l}.attn.hook_z"][0, q, h])
            diffs.append(zs[1] - zs[0])
        torch.testing.assert_close(vec[i], torch.stack(diffs).mean(0), atol=1e-5, rtol=1e-4)
    alphas = (0.0, 1.0, 3.0)
    st = steer(loaded.model, default, heads, vec, alphas, batch_size=2, progress=False)
    for i, head in enumerate(heads):
        for a, alpha in enumerate(alphas):
            ref = _reference(loaded, default, head, vec[i], alpha)
            assert (st.p_flipped[i, a].double() - ref).abs().max() <= 1e-5
    per_alpha, slopes = steering_tables(st, n_boot=50)
    x = torch.tensor(alphas, dtype=torch.float64)
    per_ctx = [
        torch.linalg.lstsq(torch.stack([torch.ones(3), x], 1), st.p_flipped[0, :, c].double()[:, None]).solution[1, 0]
        for c in range(3)
    ]
    assert abs(slopes.loc[0, "slope_p_flipped"] - float(torch.stack(per_ctx).mean())) < 1e-6
    assert len(per_alpha[per_alpha["query_class"] == "all"]) == 2 * len(heads) * len(alphas)
    by = mean_difference(loaded.model, default, flipped, heads, batch_size=2, by_class=True)
    cls = default.true_labels[:, -1]
    assert len(set(cls.tolist())) == 2  # both classes present, so both class vectors are defined
    st = steer(loaded.model, default, heads, by, (0.0, 2.0), batch_size=2, progress=False)
    for i, head in enumerate(heads):
        torch.testing.assert_close(
            by[i].nan_to_num().mul(torch.bincount(cls, minlength=2)[:, None]).sum(0) / 3, vec[i], atol=1e-5, rtol=1e-4
        )  # the class means average back to the pooled mean
        assert (st.p_flipped[i, 1].double() - _reference(loaded, default, head, by[i], 2.0)).abs().max() <= 1e-5
