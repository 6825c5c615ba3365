"""Path patching equals a brute-force two-run reference written with plain TransformerLens hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechicl.analysis.patching.exact import Patcher
from mechicl.analysis.patching.paths import INPUTS, LOGITS, path_matrix, path_patch
from mechicl.analysis.patching.positions import position_mask
from mechicl.data.pairs import pair_for
from mechicl.data.tasks import load_task
from mechicl.models.loading import load_model
from tests import helpers


def brute_force(loaded, pair, sender, receiver, inp, positions, direction, mlps="frozen"):
    """The definition, spelled out: full forwards with ``run_with_hooks``, every other head and every MLP
    frozen explicitly at the receiver run's values, full-vocabulary logits."""
    m = loaded.model
    recv, donor = (pair.corrupted, pair.clean) if direction == "denoise" else (pair.clean, pair.corrupted)
    L = m.cfg.n_layers
    rows, q = torch.arange(pair.n_contexts), pair.query_pos

    def ld(logits):
        at = logits[rows, q]
        return (at[rows, pair.answer_ids] - at[rows, pair.foil_ids]).mean()

    with torch.no_grad():
        logits_r, cache_r = m.run_with_cache(recv.tokens)
        logits_d, cache_d = m.run_with_cache(donor.tokens)
        logits_c = m(pair.clean.tokens)
        logits_k = m(pair.corrupted.tokens)
        gap = ld(logits_c) - ld(logits_k)
        w = int(q.max()) + 1
        where = torch.zeros(recv.tokens.shape, dtype=torch.bool)
        where[:, :w] = position_mask(pair, positions, w)
        sl, sh = sender

        def z_run1(l):
            def f(z, hook):
                out = cache_r[f"blocks.{l}.attn.hook_z"].clone()
                if l == sl:
                    out[:, :, sh] = torch.where(
                        where[..., None], cache_d[f"blocks.{l}.attn.hook_z"][:, :, sh], out[:, :, sh]
                    )
                return out

            return f

        hooks = [(f"blocks.{l}.attn.hook_z", z_run1(l)) for l in range(L)]
        if mlps == "frozen":
            hooks += [(f"blocks.{l}.hook_mlp_out", lambda x, hook: cache_r[hook.name]) for l in range(L)]
        kept = {}
        if receiver is not None:
            name = f"blocks.{receiver[0]}.attn.hook_{inp}"
            hooks.append((name, lambda x, hook: kept.__setitem__("x", x.clone())))
        logits1 = m.run_with_hooks(recv.tokens, fwd_hooks=hooks)
        if receiver is None:
            return float((ld(logits1) - ld(logits_r)) / gap)
        rl, rh = receiver

        def z_run2(z, hook):
            out = cache_r[hook.name].clone()
            out[rows, q, rh] = z[rows, q, rh]
            return out

        logits2 = m.run_with_hooks(
            recv.tokens, fwd_hooks=[(name, lambda x, hook: kept["x"]), (f"blocks.{rl}.attn.hook_z", z_run2)]
        )
        return float((ld(logits2) - ld(logits_r)) / gap)


def _check(loaded, pair, positions, direction, mlps="frozen"):
    heads = [(l, h) for l in range(loaded.model.cfg.n_layers) for h in range(loaded.model.cfg.n_heads)]
    res = path_patch(Patcher(loaded.model, pair), heads[:4], heads[4:], positions, direction, mlps=mlps)
    mean = res.effect.mean(-1)
    worst, nonzero = 0.0, 0
    for i, s in enumerate(res.senders):
        for j, (r, inp) in enumerate(res.targets):
            if r is not None and r[0] <= s[0]:
                continue
            ref = brute_force(loaded, pair, s, r, inp, positions, direction, mlps)
            worst = max(worst, abs(ref - float(mean[i, j])))
            nonzero += abs(ref) > 1e-3
    assert worst <= 1e-5, worst
    assert nonzero >= 1  # not a comparison of zeros (the organisms have one live last-layer head)
    return res


@pytest.mark.parametrize(
    "positions,direction,mlps",
    [("label", "denoise", "frozen"), ("all", "noise", "frozen"), ("all", "noise", "recomputed")],
)
def test_equals_brute_force_on_tiny(tiny, toy, positions, direction, mlps):
    _check(tiny, pair_for(tiny, toy, 4, 5, seed=1), positions, direction, mlps)


@pytest.mark.parametrize(
    "positions,direction,mlps",
    [
        ("label", "denoise", "frozen"),
        ("all", "denoise", "frozen"),
        ("input", "noise", "frozen"),
        ("label", "denoise", "recomputed"),
    ],
)
def test_equals_brute_force_on_the_strong_organism(positions, direction, mlps):
    loaded = load_model("organism-strong")
    res = _check(loaded, pair_for(loaded, load_task("organism"), 6, 6, seed=5), positions, direction, mlps)
    df = res.table()
    assert set(df["input"]) == {*INPUTS, LOGITS}
    assert (df["ci_low"] <= df["effect"] + 1e-9).all() and (df["effect"] <= df["ci_high"] + 1e-9).all()
    # the interval: a brute-force bootstrap loop over contexts, numerator and per-context gap drawn together
    num, gap = (res.ld[0, 0] - res.receiver_ld).double().numpy(), res.context_gap.double().numpy()
    idx = np.random.default_rng(0).integers(0, len(gap), size=(2000, len(gap)))
    lo, hi = np.percentile([num[i].mean() / gap[i].mean() for i in idx if gap[i].mean() > 0], [2.5, 97.5])
    first = df.iloc[0]  # sender 0, target 0: (L0H0, L1H0's q) on the organism
    assert (first.sender, first.input) == ("L0H0", res.targets[0][1])
    assert (first.ci_low, first.ci_high) == pytest.approx((lo, hi), abs=1e-9)
    mat = path_matrix(res, "k")
    assert mat.shape == (4, 4)  # senders L0H0..3 x receivers L1H0..3


def test_gqa_receiver_input_is_one_query_heads(toy):
    loaded = helpers.tiny_hf("llama")
    _check(loaded, pair_for(loaded, toy, 3, 5, seed=2), "all", "denoise")


def test_label_senders_have_no_query_or_direct_path(tiny, toy):
    """From label positions, with everything else frozen, nothing reaches the query slot's own residual."""
    res = path_patch(
        Patcher(tiny.model, pair_for(tiny, toy, 4, 5, seed=1)), [(0, 0), (0, 1)], [(1, 0), (1, 2)], "label"
    )
    df = res.table()
    assert (df.loc[df["input"].isin(["q", LOGITS]), "effect"].abs() < 1e-6).all()
    assert (df.loc[df["input"].isin(["k", "v"]), "effect"].abs() > 1e-4).any()
    with pytest.raises(ValueError, match="inputs"):
        path_patch(Patcher(tiny.model, pair_for(tiny, toy, 2, 4)), [(0, 0)], [(1, 0)], inputs=("o",))


def test_equals_transformer_lens_direct_path_into_the_last_layer(toy):
    """TL 4.3's ``get_act_patch_direct_path`` patches the receiver's input at every position; into the
    last layer only the readout slot's output can reach the metric, so the definitions agree. TL
    supports it only on HF attention bridges (not the native tiny/organism models), and on GQA only
    for ``q``, so the comparison runs on the random Llama (GQA) for ``q``."""
    import transformer_lens.patching as tlp

    loaded = helpers.tiny_hf("llama")
    pair = pair_for(loaded, toy, 4, 5, seed=4)
    m, last = loaded.model, loaded.model.cfg.n_layers - 1
    metric = helpers.tl_metric(loaded, pair)
    with torch.no_grad():
        _, clean = m.run_with_cache(pair.clean.tokens)
        _, corr = m.run_with_cache(pair.corrupted.tokens)
    receivers = [(last, h) for h in range(m.cfg.n_heads)]
    res = path_patch(Patcher(m, pair), [(0, 0), (0, 3)], receivers, "all", "denoise", inputs=("q",))
    mean = res.effect.mean(-1)
    for i, (sl, sh) in enumerate(res.senders):
        with torch.no_grad():
            ref = tlp.get_act_patch_direct_path(
                m, pair.corrupted.tokens, clean, corr, metric, sl, sh, "q", verbose=False
            )
        assert ref[last].abs().max() > 1e-4  # small on a random model: compare tightly
        torch.testing.assert_close(mean[i, :-1], ref[last].float(), atol=5e-6, rtol=0)


def test_table_interval_widens_for_contexts_that_share_task_rows():
    """Contexts that share rows are not independent: the path table's interval is the context bootstrap's, widened
    about the estimate by sqrt(design effect); distinct rows leave it as it is (design effect 1)."""
    from mechicl.analysis.patching.paths import PathResult
    from mechicl.analysis.stats import ratio_ci, shared_row_design_effect

    rng = np.random.default_rng(0)
    n = 12
    ld = torch.tensor(rng.normal(1.0, 0.5, (1, 1, n)), dtype=torch.float32)
    base = torch.tensor(rng.normal(0.0, 0.2, n), dtype=torch.float32)
    gap = torch.tensor(rng.normal(2.0, 0.3, n), dtype=torch.float32)
    shared = torch.arange(n * 4).reshape(n, 4) % 8  # every context draws from the same 8 rows
    distinct = torch.arange(n * 4).reshape(n, 4)

    def table(items):
        r = PathResult("denoise", "label", ((0, 0),), ((None, LOGITS),), ld, base, gap, items=items)
        return r.table(n_boot=500).iloc[0]

    plain, wide, same = table(None), table(shared), table(distinct)
    est, lo, hi = ratio_ci((ld - base).numpy()[0, 0], gap.numpy(), n_boot=500)
    f = np.sqrt(shared_row_design_effect(shared.numpy()))
    assert f > 1.2
    np.testing.assert_allclose([plain.ci_low, plain.ci_high], [lo, hi], rtol=1e-6)
    np.testing.assert_allclose([same.ci_low, same.ci_high], [lo, hi], rtol=1e-6)
    np.testing.assert_allclose([wide.ci_low, wide.ci_high], [est - f * (est - lo), est + f * (hi - est)], rtol=1e-6)
