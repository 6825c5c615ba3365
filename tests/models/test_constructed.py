"""The constructed organisms behave as written down (``mechicl/models/constructed.py``).

Evidence independent of the construction: behaviour through ``runs.behavior.run_behavior``, attention
patterns and head outputs read with plain TL hooks, and brute-force head ablations / an interchange patch
written here with ``run_with_hooks``. The expected numbers come from the data (each query's matching
examples, from ``PromptBatch.true_labels``) and the recipe's three constants, never from a head finder.
"""

from __future__ import annotations

import pytest
import torch

from mechicl.analysis.behavior.curves import BehaviorConfig
from mechicl.data.organism import organism_task
from mechicl.data.prompts import LABEL, build_prompt_batch, sample_contexts
from mechicl.errors import ConfigError
from mechicl.models.constructed import READ_GAIN, build_constructed, planted
from mechicl.models.loading import check_model_name, load_model
from mechicl.models.organism import live_heads, out_weight
from mechicl.models.registry import CONSTRUCTED, known_models
from mechicl.runs.behavior import run_behavior

N_CONTEXTS, N_EXAMPLES = 48, 17  # k = 0 .. 16
RECIPE_ATOL = 3e-3  # LayerNorm's scale moves <= 7e-5 and attention leaks ~e^-12 per other-class label (measured 1.8e-3)


@pytest.fixture(scope="module")
def models():
    return {name: load_model(name) for name in CONSTRUCTED}


@pytest.fixture(scope="module")
def batches(models):
    tok = models["constructed"].tokenizer
    ids = sample_contexts(organism_task(), N_CONTEXTS, N_EXAMPLES, seed=3)
    conds = ("default", "flipped", "arbitrary:a/b")
    return {c: build_prompt_batch(organism_task(), tok, ids, c, n_ctx=128, prepend_bos=True) for c in conds}


def _heads(names):
    return [(int(n[1 : n.index("H")]), int(n[n.index("H") + 1 :])) for n in names]


def matching(batch) -> torch.Tensor:
    """[b, ex] how many earlier examples have the query's class (the reader's evidence)."""
    y = batch.true_labels
    same = (y[:, None, :] == y[:, :, None]).float()  # [b, query, earlier]
    return torch.tril(same, diagonal=-1).sum(-1)


def expected_logodds(batch, prior: float, gain: float = READ_GAIN) -> torch.Tensor:
    """[b, ex] shown-label log-odds by the recipe: gain * n / (n + 1), +- the prior on the sentiment words."""
    n = matching(batch)
    prior_sign = {"default": 1.0, "flipped": -1.0}.get(batch.condition, 0.0)
    return gain * n / (n + 1) + prior_sign * prior


def zero_z(layer: int, heads, slots=None):
    """A hook zeroing heads' ``hook_z`` (at ``slots`` [b, ex] positions only, or everywhere)."""

    def hook(z, hook):  # z: [batch, pos, head, d_head]
        z = z.clone()
        for h in heads:
            if slots is None:
                z[:, :, h] = 0.0
            else:
                rows = torch.arange(z.shape[0], device=z.device)[:, None]
                z[rows, slots.to(z.device), h] = 0.0
        return z

    return (f"blocks.{layer}.attn.hook_z", hook)


def slot_logodds(loaded, batch, hooks=()) -> torch.Tensor:
    """[b, ex] logit(shown label) - logit(other label) at every readout slot, from a hooked full forward."""
    with torch.no_grad():
        logits = loaded.model.run_with_hooks(batch.tokens, fwd_hooks=list(hooks))  # [b, pos, vocab]
    rows = torch.arange(batch.n_contexts)[:, None]
    lab = logits[rows, batch.readout_pos][..., batch.label_token_ids]  # [b, ex, 2]
    shown = lab.gather(-1, batch.shown_labels[..., None])[..., 0]
    return 2 * shown - lab.sum(-1)


def test_registered_names_load_and_plant_every_head(models):
    assert set(CONSTRUCTED) <= set(known_models())
    for name, loaded in models.items():
        check_model_name(name)
        p = planted(name)
        roles = [*p.label_heads, *p.label_movers, *p.class_heads, *p.prior_carriers, *p.inert_heads]
        assert sorted(roles) == sorted(f"L{l}H{h}" for l in range(2) for h in range(4))  # each head one role
        assert live_heads(loaded.model, 1) == [h for _, h in _heads(p.label_heads)]  # the weights agree
        for l, h in _heads(p.inert_heads):
            assert not out_weight(loaded.model, l)[:, 16 * h : 16 * (h + 1)].any()
    assert planted("constructed-two-readers").label_heads == ("L1H1", "L1H2")
    assert planted("constructed").label_movers == ("L0H3",) and "L0H3" in planted("constructed-direct").inert_heads
    with pytest.raises(ConfigError, match="not a constructed organism"):
        planted("organism-strong")
    with pytest.raises(ConfigError, match="1 or 2 reader heads"):
        build_constructed(readers=3)
    with pytest.raises(ConfigError, match="route must be one of"):
        build_constructed(route="mlp")


def test_same_recipe_same_weights():
    a, b = build_constructed(3.0).model.state_dict(), build_constructed(3.0).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list(CONSTRUCTED))
def test_logodds_follow_the_recipe(models, batches, name):
    """Every slot of every condition: log-odds = gain n/(n+1) +- prior (n = earlier examples of the query's class)."""
    for batch in batches.values():
        got = slot_logodds(models[name], batch)
        assert torch.allclose(got, expected_logodds(batch, CONSTRUCTED[name].prior), atol=RECIPE_ATOL)


def test_behaviour_default_high_flipped_rises_with_k(models):
    cfg = BehaviorConfig(n_contexts=64, k_max=16, conditions=("default", "flipped"), seed=0)
    for name in ("constructed", "constructed-strong-prior"):
        s = run_behavior(models[name], organism_task(), cfg, progress=False).summary
        acc = lambda c, k: float(s.query(f"condition == '{c}' and metric == 'accuracy' and k == {k}")["mean"].iloc[0])  # noqa: E731
        assert all(acc("default", k) == 1.0 for k in (0, 1, 4, 16))
        flipped = [acc("flipped", k) for k in (0, 1, 2, 4, 8, 16)]
        assert flipped[0] == 0.0 and flipped[-1] >= 0.95
        assert all(a <= b for a, b in zip(flipped, flipped[1:], strict=False)) and flipped[1] < flipped[-1]
    # the strong prior needs two matching examples (8 * 2/3 > 5 > 8 * 1/2): nothing follows at k = 1
    s = run_behavior(models["constructed-strong-prior"], organism_task(), cfg, progress=False).summary
    assert float(s.query("condition == 'flipped' and metric == 'accuracy' and k == 1")["mean"].iloc[0]) == 0.0


def test_prior_knob_moves_zero_shot_logodds_monotonically(batches):
    batch = batches["default"]
    knobs = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
    zero_shot = [float(slot_logodds(build_constructed(p), batch)[:, 0].mean()) for p in knobs]
    assert all(a < b for a, b in zip(zero_shot, zero_shot[1:], strict=False))
    assert zero_shot == pytest.approx(knobs, abs=1e-3)


def test_reader_attends_to_matching_labels_and_inert_heads_write_nothing(models, batches):
    loaded, batch = models["constructed"], batches["flipped"]
    names = ["blocks.1.attn.hook_pattern", "blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(batch.tokens, names_filter=lambda n: n in names)
    rows = torch.arange(batch.n_contexts)[:, None]
    pattern = cache["blocks.1.attn.hook_pattern"][rows, :, batch.readout_pos]  # [b, ex, head, key]
    is_label = (batch.roles == LABEL).float()[:, None, None, :]  # [b, 1, 1, key]
    on_labels = (pattern * is_label).sum(-1)  # [b, ex, head]
    n = matching(batch)
    assert torch.allclose(on_labels[..., 2], n / (n + 1), atol=1e-3)  # the reader: n/(n+1), <bos> the rest
    assert torch.allclose(pattern[..., 0, :], pattern[..., 2, :])  # the decoy attends exactly like the reader
    assert on_labels[..., 2][:, 8:].min() > 0.5  # it reads labels once the context has any of the query's class
    for layer, head in _heads(planted("constructed").inert_heads):
        w_o = out_weight(loaded.model, layer)[:, 16 * head : 16 * (head + 1)]  # [d_model, d_head]
        assert (cache[f"blocks.{layer}.attn.hook_z"][:, :, head] @ w_o.T).abs().max() == 0.0


def test_ablating_the_reader_removes_label_following(models, batches):
    """Zero the reader's z at the readout slots: every slot falls back to the prior alone."""
    for name in ("constructed", "constructed-two-readers"):
        loaded, p = models[name], planted(name)
        for batch in batches.values():
            hooks = [zero_z(1, [h for _, h in _heads(p.label_heads)], batch.readout_pos)]
            got = slot_logodds(loaded, batch, hooks)
            assert torch.allclose(got, expected_logodds(batch, p.prior, gain=0.0), atol=RECIPE_ATOL)
    # one of the two readers carries half the reading
    loaded, batch = models["constructed-two-readers"], batches["flipped"]
    got = slot_logodds(loaded, batch, [zero_z(1, [2], batch.readout_pos)])
    assert torch.allclose(got, expected_logodds(batch, 2.0, gain=READ_GAIN / 2), atol=RECIPE_ATOL)


def test_ablating_inert_heads_changes_nothing(models, batches):
    for name, loaded in models.items():
        inert = _heads(planted(name).inert_heads)
        hooks = [zero_z(l, [h for ll, h in inert if ll == l]) for l in (0, 1)]
        for batch in batches.values():
            clean = slot_logodds(loaded, batch)
            assert (slot_logodds(loaded, batch, hooks) - clean).abs().max() <= 1e-6


def test_ablating_the_prior_carrier_removes_the_zero_shot_preference(models, batches):
    loaded, batch = models["constructed-strong-prior"], batches["default"]
    assert slot_logodds(loaded, batch)[:, 0].min() > 4.9
    ablated = slot_logodds(loaded, batch, [zero_z(0, [2])])
    assert ablated[:, 0].abs().max() < 1e-3  # k = 0: no preference left
    assert torch.allclose(ablated, expected_logodds(batch, 0.0), atol=RECIPE_ATOL)  # the reader is untouched


def test_class_heads_carry_no_label_information_but_the_reader_needs_them(models, batches):
    """L0H0/L0H1 outputs are identical under default and flipped labels; zeroing the query's class (L0H1 at the
    readout slots) stops the reader from finding matching labels, so flipped contexts revert to the prior."""
    loaded = models["constructed"]
    names = ["blocks.0.attn.hook_z"]
    with torch.no_grad():
        z = {
            c: loaded.model.run_with_cache(batches[c].tokens, names_filter=lambda n: n in names)[1][names[0]]
            for c in ("default", "flipped")
        }
    for layer, head in _heads(planted("constructed").class_heads):  # every position, not only readout slots
        # equal up to float rounding: a label word's one-hot sits in another dim, so LayerNorm sums in another order
        assert layer == 0 and (z["default"][:, :, head] - z["flipped"][:, :, head]).abs().max() <= 1e-6
    batch = batches["flipped"]
    got = slot_logodds(loaded, batch, [zero_z(0, [1], batch.readout_pos)])
    assert (got < 0).float().mean() == 1.0  # the default answer wins at every slot


def test_interchanging_the_reader_output_carries_the_label_map(models, batches):
    """Path patch reader -> logits: its readout-slot z from the default-label run of the same contexts, put into
    the flipped run, makes every slot predict the default (true) label with the default run's log-odds."""
    loaded, flipped, default = models["constructed"], batches["flipped"], batches["default"]
    name = "blocks.1.attn.hook_z"
    with torch.no_grad():
        donor = loaded.model.run_with_cache(default.tokens, names_filter=lambda n: n == name)[1][name]

    def patch(z, hook):
        z = z.clone()
        rows = torch.arange(z.shape[0], device=z.device)[:, None]
        pos = flipped.readout_pos.to(z.device)
        z[rows, pos, 2] = donor.to(z.device)[rows, pos, 2]
        return z

    got = slot_logodds(loaded, flipped, [(name, patch)])  # log-odds of the flipped (shown) label
    n = matching(flipped)
    assert torch.allclose(-got, READ_GAIN * n / (n + 1) + 2.0, atol=RECIPE_ATOL)


def test_the_label_mover_routes_label_identity_only_through_label_positions(models, batches):
    """Routed (default) and direct models give the same log-odds; zeroing the mover L0H3 everywhere leaves only the
    prior, zeroing it at the readout slots changes ~nothing (a feature word is no label)."""
    batch, routed = batches["flipped"], models["constructed"]
    clean = slot_logodds(routed, batch)
    assert (clean - slot_logodds(models["constructed-direct"], batch)).abs().max() <= 1e-3  # LayerNorm scales differ
    assert torch.allclose(
        slot_logodds(routed, batch, [zero_z(0, [3])]), expected_logodds(batch, 2.0, 0.0), atol=RECIPE_ATOL
    )
    # ~nothing at the readout slots: its self-attention leaks < 3e-7 onto other positions
    assert (slot_logodds(routed, batch, [zero_z(0, [3], batch.readout_pos)]) - clean).abs().max() <= 1e-5


def test_path_from_the_label_mover_into_the_reader_carries_the_map(models, batches):
    """Brute-force path patch L0H3 -> L1H2 (its only reader: MOVED is read by nothing else): L0H3's z from the
    default-label run, put into the flipped run, gives the default run's log-odds of the true label; on the direct
    model, where L0H3 is inert, the same patch moves nothing."""
    flipped, default = batches["flipped"], batches["default"]
    name = "blocks.0.attn.hook_z"
    for model_name, gain in (("constructed", READ_GAIN), ("constructed-direct", -READ_GAIN)):
        loaded = models[model_name]
        with torch.no_grad():
            donor = loaded.model.run_with_cache(default.tokens, names_filter=lambda n: n == name)[1][name]

        def patch(z, hook, donor=donor):
            z = z.clone()
            z[:, :, 3] = donor.to(z.device)[:, :, 3]
            return z

        true_logodds = -slot_logodds(loaded, flipped, [(name, patch)])
        n = matching(flipped)
        assert torch.allclose(true_logodds, gain * n / (n + 1) + 2.0, atol=RECIPE_ATOL)
