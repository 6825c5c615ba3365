"""Head projections on the label direction equal direct logit attribution (``analysis.inside.dla``, itself checked to
sum to the model's logits), on a LayerNorm model and on a Gemma-3 layout (post-attention norm, GQA)."""

from __future__ import annotations

import pytest
import torch

from mechicl.analysis.aggregation.direct import curves, project_heads, query_projection
from mechicl.analysis.inside.dla import direct_logits
from mechicl.data.evidence import evidence_batches
from mechicl.data.prompts import sample_contexts
from tests import helpers


@pytest.mark.parametrize("arch", ["tiny", "gemma"])
def test_projection_equals_dla(arch, tiny, toy):
    loaded = tiny if arch == "tiny" else helpers.tiny_hf("gemma")
    b = helpers.batch(loaded, toy, "flipped", n_contexts=3, n_examples=5)
    heads = [(0, 1), (1, 0), (1, 3)]
    proj, logits, _, z = query_projection(loaded.model, b, heads, batch_size=2)
    dl = direct_logits(loaded.model, b, progress=False)
    true = b.true_labels[:, -1]
    flipped = (true + 1) % 2
    rows = torch.arange(3)
    for i, (l, h) in enumerate(heads):
        c = dl.names.index(f"L{l}H{h}")
        ref = dl.contrib[c, rows, -1, flipped] - dl.contrib[c, rows, -1, true]
        torch.testing.assert_close(proj[:, i], ref.double(), atol=1e-5, rtol=1e-4)
    for c in range(3):  # each head's hook_z at the query slot (the donors of the total effect)
        _, cache = loaded.model.run_with_cache(b.tokens[c : c + 1, : int(b.lengths[c])])
        for i, (l, h) in enumerate(heads):
            torch.testing.assert_close(
                z[c, i], cache[f"blocks.{l}.attn.hook_z"][0, b.readout_pos[c, -1], h], atol=1e-5, rtol=1e-4
            )
    ref_logits = helpers.full_label_logits(loaded, b)[:, -1]
    torch.testing.assert_close(logits.float(), ref_logits.float(), atol=1e-4, rtol=1e-4)


def test_curves_and_delta(tiny, toy):
    ids = sample_contexts(toy, 4, 5, seed=1)
    ev = evidence_batches(toy, tiny.tokenizer, ids, n_ctx=tiny.n_ctx, prepend_bos=True, placements=("last", "first"))
    proj = project_heads(tiny.model, ev, [(1, 2)], progress=False)
    assert proj.values.shape == (len(ev.batches), 4, 1)
    assert torch.equal(proj.delta[0], torch.zeros(4, 1, dtype=proj.delta.dtype))
    single, _, scale, _ = query_projection(tiny.model, ev.batches[3], [(1, 2)])
    _, _, scale0, _ = query_projection(tiny.model, ev.batches[0], [(1, 2)])
    assert not torch.allclose(scale, scale0)  # the final norm's scale moves with the labels ...
    torch.testing.assert_close(proj.values[3], single * (scale / scale0)[:, None])  # ... and is fixed at rendering 0
    table = curves(proj, n_boot=50)
    last = table[(table["series"] == "L1H2") & (table["placement"] == "last") & (table["query_class"] == "all")]
    last = last.sort_values("count")
    assert last["count"].tolist() == [0, 1, 2, 3, 4]  # the shared none / all renderings close every placement's curve
    assert (table["ci_low"] <= table["mean"] + 1e-12).all() and (table["mean"] <= table["ci_high"] + 1e-12).all()
