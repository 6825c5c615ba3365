"""Route patching against a brute-force reference built from plain TL hooks: one truncated forward per (context,
slot) in which every layer's keys and values before the slot are overwritten from the two renderings' own cached
runs (the donor's at the route's positions, the receiver's elsewhere), so only the slot's own computation is free."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechicl.analysis.engine.hooks import run_to_final
from mechicl.analysis.engine.readout import unembed_labels
from mechicl.analysis.engine.slots import SlotStepper
from mechicl.analysis.prior.routes import ROUTES, route_patch, route_sources, route_table
from tests import helpers

K_MIN = 2


@pytest.fixture(scope="module", params=["llama", "gemma", "tiny"])
def setup(request, tiny):
    # gemma: a 6-token sliding window, shorter than every context, so the windowed masks are exercised;
    # tiny: a TL-native model without a KV cache (the full-forward path)
    if request.param == "tiny":
        loaded = tiny
    else:
        loaded = helpers.tiny_hf(request.param, **({"sliding_window": 6} if request.param == "gemma" else {}))
    task = helpers.toy_task(2)
    kw = dict(n_contexts=3, n_examples=5, seed=1)
    correct, flipped = (helpers.batch(loaded, task, c, **kw) for c in ("default", "flipped"))
    st = {c: SlotStepper(loaded.model, b, K_MIN) for c, b in (("correct", correct), ("flipped", flipped))}
    assert st["correct"].mode == ("full" if request.param == "tiny" else "kv")
    return loaded, correct, flipped, st


def _kv(loaded, tokens):
    """Every layer's hook_k / hook_v of one unpadded context (the runs' own values, from the model alone)."""
    names = [f"blocks.{l}.attn.hook_{x}" for l in range(2) for x in "kv"]
    _, cache = loaded.model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {n: cache[n] for n in names}


def _reference(loaded, recv, donor, i, e, sources, through=None):
    """LD inputs at slot ``e`` of context ``i``: label logits of the route-patched truncated forward."""
    q = int(recv.readout_pos[i, e])
    toks = recv.tokens[i : i + 1, : q + 1]
    kv_r, kv_d = _kv(loaded, toks), _kv(loaded, donor.tokens[i : i + 1, : q + 1])
    src = torch.as_tensor(sources)  # [pos] bool: positions < q read from the donor

    def mix(name):
        def hook(x, hook):
            x = x.clone()
            x[:, :q] = torch.where(src[:q, None, None], kv_d[name][:, :q], kv_r[name][:, :q])
            return x

        return hook

    store = {}

    def keep(x, hook):
        store[hook.name] = x[:, q].clone()

    hooks = [(n, mix(n)) for n in kv_r] + [(f"blocks.{l}.attn.hook_z", keep) for l in range(2)]
    with torch.no_grad():
        resid = run_to_final(loaded.model, toks, hooks)
        if through is None:
            return unembed_labels(loaded.model, resid[:, q], recv.label_token_ids)[0]

        def put(l):
            def hook(z, hook):
                z = z.clone()
                for ll, h in through:
                    if ll == l:
                        z[:, q, h] = store[hook.name][:, h]
                return z

            return hook

        resid = run_to_final(loaded.model, toks, [(f"blocks.{l}.attn.hook_z", put(l)) for l in range(2)])
        return unembed_labels(loaded.model, resid[:, q], recv.label_token_ids)[0]


def _ld(logits, true, foil):
    return float(logits[true] - logits[foil])


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_routes_equal_brute_force_hooks(setup, direction):
    loaded, correct, flipped, st = setup
    through = [[(1, 2)], [(0, 1), (1, 3)]]
    res = route_patch(st["correct"], st["flipped"], through=through, direction=direction)
    assert res.names == (*ROUTES, "labels via L1H2", "labels via L0H1 L1H3")
    recv, donor = (correct, flipped) if direction == "noise" else (flipped, correct)
    rs = st["correct" if direction == "noise" else "flipped"]
    for i in range(correct.n_contexts):
        for s in range(rs.n_slots):
            e = K_MIN + s
            true, foil = int(correct.true_labels[i, e]), int(flipped.shown_labels[i, e])
            off = int(rs.layout.offset[i])
            for j, r in enumerate(ROUTES):
                cols = route_sources(rs, r)[i, s]
                sources = cols[off:]  # columns -> token positions of the unpadded context
                ref = _ld(_reference(loaded, recv, donor, i, e, sources), true, foil)
                assert res.ld[j, i, s] == pytest.approx(ref, abs=1e-4), (direction, r, i, s)
            sources = route_sources(rs, "labels")[i, s][off:]
            for j, heads in enumerate(through):
                ref = _ld(_reference(loaded, recv, donor, i, e, sources, heads), true, foil)
                assert res.ld[len(ROUTES) + j, i, s] == pytest.approx(ref, abs=1e-4), (direction, heads, i, s)
    assert res.check() < 1e-4  # 'all' is the donor run
    assert np.abs(res.carried[0]).max() > 1e-3  # the label route carries something: the comparison can fail


def test_route_sources_partition_the_positions_before_the_slot(setup):
    _, correct, _, st = setup
    rs = st["correct"]
    parts = [route_sources(rs, r) for r in ("labels", "query", "rest")]
    total = route_sources(rs, "all")
    assert torch.equal(parts[0] | parts[1] | parts[2], total)
    assert not (parts[0] & parts[1]).any() and not (parts[0] & parts[2]).any() and not (parts[1] & parts[2]).any()
    i, s = 1, 1  # slot of example K_MIN + 1: sees K_MIN + 1 labels; its query is that example's input
    off, e = int(rs.layout.offset[i]), K_MIN + s
    labels = (parts[0][i, s].nonzero()[:, 0] - off).tolist()
    assert labels == correct.label_pos[i, :e].tolist()
    a, b = correct.input_spans[i, e].tolist()
    assert (parts[1][i, s].nonzero()[:, 0] - off).tolist() == list(range(a, b))
    with pytest.raises(ValueError, match="route must be one of"):
        route_sources(rs, "labelz")


def test_route_table_shares_are_ratios_of_means(setup):
    _, _, _, st = setup
    res = route_patch(st["correct"], st["flipped"])
    tab = route_table(res, None, k_groups=[(K_MIN, 4)], n_boot=200)
    by = tab.set_index("route")
    if res.gap.mean() <= 0:  # no gap to share out (a random tiny model may have none): every share is NaN
        assert by.share.isna().all()
        return
    for j, r in enumerate(res.names):
        assert by.loc[r, "share"] == pytest.approx(res.carried[j].mean() / res.gap.mean())
    parts = sum(by.loc[r, "share"] for r in ("labels", "query", "rest"))
    assert by.loc["interaction", "share"] == pytest.approx(1 - parts)
    assert by.loc["all", "share"] == pytest.approx(1.0, abs=1e-4)
    prior = np.where(np.arange(res.gap.size).reshape(res.gap.shape) % 2 == 0, -0.5, 1.5)
    binned = route_table(res, prior, k_groups=[(K_MIN, 4)], n_boot=200)
    assert set(binned.prior_bin) == {"[-1, +0)", "[+1, +2)"}
    assert binned.groupby("route").n_slots.sum().eq(res.gap.size).all()  # every slot in exactly one bin


def test_chunked_route_runs_equal_one_run(setup):
    """One intervention per step (a score budget of 1 byte) gives the same routes as the default chunks."""
    loaded, correct, flipped, st = setup
    one = {
        c: SlotStepper(loaded.model, b, K_MIN, score_bytes=1) for c, b in (("correct", correct), ("flipped", flipped))
    }
    if st["correct"].mode == "kv":
        assert one["correct"]._kv_chunk(4, keys=2 * one["correct"].width) == 1
    a = route_patch(st["correct"], st["flipped"], through=[[(1, 2)]])
    b = route_patch(one["correct"], one["flipped"], through=[[(1, 2)]])
    np.testing.assert_allclose(a.ld, b.ld, atol=1e-5)
