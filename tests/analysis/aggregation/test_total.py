"""The total (through-MLP) effect equals a brute-force reference written with plain TL hooks: full forwards of the
m = 0 rendering with ``run_with_hooks`` replacing one head's ``hook_z`` at the query slot by the donor rendering's
(from ``run_with_cache``), one context at a time, baseline from the model's own unpatched forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mechicl.analysis.aggregation.direct import curves, project_heads
from mechicl.analysis.aggregation.total import total_effects
from mechicl.analysis.engine.hooks import head_masks
from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.data.evidence import evidence_batches
from mechicl.data.prompts import sample_contexts
from tests import helpers


def _ld(loaded, b, c, hooks=()):
    n, q = int(b.lengths[c]), int(b.readout_pos[c, -1])
    true = int(b.true_labels[c, -1])
    ids = b.label_token_ids
    with torch.no_grad():
        logits = loaded.model.run_with_hooks(b.tokens[c : c + 1, :n], fwd_hooks=list(hooks))[0, q].double()
    return logits[ids[(true + 1) % len(ids)]] - logits[ids[true]]


def _reference(loaded, ev, heads):
    """[rendering, context, head]: LD(m = 0 with head patched from rendering r) - LD(m = 0)."""
    R, n = len(ev.batches), ev.default.n_contexts
    out = torch.zeros(R, n, len(heads), dtype=torch.float64)
    recv = ev.default
    for c in range(n):
        base = _ld(loaded, recv, c)
        q = int(recv.readout_pos[c, -1])
        for r in range(R):
            donor = ev.batches[r]
            with torch.no_grad():
                _, cache = loaded.model.run_with_cache(donor.tokens[c : c + 1, : int(donor.lengths[c])])
            qd = int(donor.readout_pos[c, -1])
            for i, (l, h) in enumerate(heads):
                z_donor = cache[f"blocks.{l}.attn.hook_z"][0, qd, h].clone()

                def put(z, hook, h=h, z_donor=z_donor):
                    z = z.clone()
                    z[0, q, h] = z_donor
                    return z

                out[r, c, i] = _ld(loaded, recv, c, [(f"blocks.{l}.attn.hook_z", put)]) - base
    return out


@pytest.mark.parametrize("arch", ["tiny", "gemma"])
def test_total_effect_equals_plain_hooks(arch, tiny, toy):
    loaded = tiny if arch == "tiny" else helpers.tiny_hf("gemma")
    ids = sample_contexts(toy, 3, 5, seed=3)
    ev = evidence_batches(
        toy,
        loaded.tokenizer,
        ids,
        n_ctx=loaded.n_ctx,
        prepend_bos=loaded.prepend_bos,
        placements=("last", "random"),
        counts=(1, 3),
    )
    heads = [(0, 1), (1, 2), (0, 3)]
    proj = project_heads(loaded.model, ev, heads, batch_size=2, progress=False)
    tot = total_effects(loaded.model, ev, proj, batch_size=2, progress=False)  # two chunks: 2 + 1 contexts
    ref = _reference(loaded, ev, heads)
    assert ref[1:].abs().max() > 1e-3  # the reference is not trivially zero
    assert (tot.values - ref).abs().max() <= 1e-5
    assert torch.equal(tot.delta, tot.values) and tot.measure == "total" and tot.z is None
    assert not torch.allclose(tot.values, proj.delta, atol=1e-3)  # the total effect is not the direct projection
    # patching every head at the query slot reproduces the donor rendering's answer there (MLPs recomputed): the
    # model's own ld_flipped, measured by the projection forwards
    st = ReadoutStepper(loaded.model, ev.default)
    L, H = loaded.model.cfg.n_layers, loaded.model.cfg.n_heads
    every = head_masks([[(l, h) for l in range(L) for h in range(H)]], L, H)
    rows, true = torch.arange(3), ev.default.true_labels[:, -1]
    for r, donor in enumerate(ev.batches):
        out = st.run(every, ReadoutStepper(loaded.model, donor).z)[0].double()
        ld = out[rows, (true + 1) % 2] - out[rows, true]
        torch.testing.assert_close(ld, proj.ld_flipped[r], atol=1e-4, rtol=1e-4)
    table = curves(tot, n_boot=20, model_series=False)
    assert set(table["measure"]) == {"total"} and set(table["series"]) == {"L0H1", "L1H2", "L0H3"}


def test_total_effects_refuses_projections_without_donors(tiny, toy):
    ids = sample_contexts(toy, 2, 4, seed=1)
    ev = evidence_batches(toy, tiny.tokenizer, ids, n_ctx=tiny.n_ctx, prepend_bos=True, placements=("last",))
    proj = project_heads(tiny.model, ev, [(1, 0)], progress=False)
    with pytest.raises(ValueError, match="project_heads"):
        total_effects(tiny.model, ev, dataclasses.replace(proj, z=None), progress=False)
    other = evidence_batches(toy, tiny.tokenizer, ids, n_ctx=tiny.n_ctx, prepend_bos=True, placements=("first", "last"))
    with pytest.raises(ValueError, match="same EvidenceBatches"):
        total_effects(tiny.model, other, proj, progress=False)
