"""Exact patching equals TransformerLens's patching functions; pairs are validated; attribution is exact when linear."""

from __future__ import annotations

import dataclasses
import warnings

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp

from mechicl.analysis.engine.hooks import head_masks
from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.analysis.patching.attribution import agreement, attribution_patch
from mechicl.analysis.patching.exact import KINDS, Patcher
from mechicl.data.pairs import make_pair, pair_for, pair_from_batches
from mechicl.data.prompts import INPUT, LABEL, sample_contexts
from mechicl.data.tasks import load_task
from mechicl.data.words import VOCAB
from mechicl.errors import PairError
from mechicl.runs.folder import RunFolder
from mechicl.runs.patch import write_patch_results
from tests import helpers

TL_SWEEPS = {
    "resid": tlp.get_act_patch_resid_pre,
    "attn_out": tlp.get_act_patch_attn_out,
    "mlp_out": tlp.get_act_patch_mlp_out,
    "head_out": tlp.get_act_patch_attn_head_out_all_pos,
}


def tl_reference(loaded, pair, kind, direction, patcher):
    """TransformerLens's own sweep with the same normalised metric."""
    m = loaded.model
    metric = helpers.tl_metric(loaded, pair)
    recv, donor = (pair.corrupted, pair.clean) if direction == "denoise" else (pair.clean, pair.corrupted)
    with torch.no_grad():
        _, cache = m.run_with_cache(donor.tokens)
        return TL_SWEEPS[kind](m, recv.tokens, cache, metric)


# --------------------------------------------------------------- pairs ---


def test_pair_differs_only_at_labels(tiny, toy):
    pair = pair_for(tiny, toy, 4, 6)
    diff = pair.clean.tokens != pair.corrupted.tokens
    assert diff.any() and (pair.clean.roles[diff] == LABEL).all()
    assert torch.equal(pair.clean.readout_pos, pair.corrupted.readout_pos)
    assert (pair.answer != pair.foil).all()
    assert torch.equal(pair.answer, pair.clean.true_labels[:, -1])
    assert torch.equal(pair.foil, pair.corrupted.shown_labels[:, -1])


def test_last_m_flips_only_the_last_m_demonstrations(tiny, toy):
    ids = sample_contexts(toy, 3, 6, seed=1)
    pair = make_pair(toy, tiny.tokenizer, ids, n_ctx=tiny.n_ctx, prepend_bos=True, last_m=2)
    differs = pair.clean.shown_labels != pair.corrupted.shown_labels
    assert differs[:, 3:5].all() and not differs[:, :3].any() and not differs[:, 5].any()
    assert (pair.answer != pair.foil).all()
    with pytest.raises(PairError, match="last_m"):
        make_pair(toy, tiny.tokenizer, ids, n_ctx=tiny.n_ctx, prepend_bos=True, last_m=6)


def test_pair_builder_rejects_mismatched_pairs(tiny, toy):
    pair = pair_for(tiny, toy, 3, 5)
    clean, corr = pair.clean, pair.corrupted
    with pytest.raises(PairError, match="shape"):
        pair_from_batches(clean, corr.select([0, 1]))
    mask = corr.attention_mask.clone()
    n0 = int(mask[0].sum())
    mask[0, n0 - 1] = 0
    with pytest.raises(PairError, match="lengths"):
        pair_from_batches(clean, dataclasses.replace(corr, attention_mask=mask))
    tokens = corr.tokens.clone()
    r, p = (corr.roles == INPUT).nonzero()[0].tolist()
    tokens[r, p] = (tokens[r, p] + 1) % len(VOCAB)
    with pytest.raises(PairError, match=rf"non-label token: context {r}, position {p}"):
        pair_from_batches(clean, dataclasses.replace(corr, tokens=tokens))
    with pytest.raises(PairError, match="identical"):
        pair_from_batches(clean, clean)
    other = helpers.batch(tiny, toy, "flipped", n_contexts=3, n_examples=5, seed=7)
    with pytest.raises(PairError):
        pair_from_batches(clean, other)


# --------------------------------------------------- exact == TransformerLens ---


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("kind", list(TL_SWEEPS))
def test_exact_patching_equals_transformer_lens_tiny(tiny, toy, kind, direction):
    pair = pair_for(tiny, toy, 3, 5)
    patcher = Patcher(tiny.model, pair, max_rows=8)
    ours = patcher.sweep(kind, direction)
    ref = tl_reference(tiny, pair, kind, direction, patcher)
    ref = ref[:, : ours.values.shape[1]]  # TL also sweeps positions after the query slot (no effect there)
    helpers.assert_patch_close(ours, ref)


def _tl_generic(loaded, pair, kind, direction, patcher):
    """TL's generic_activation_patch with the setter that defines each label/readout kind."""
    rows = torch.arange(pair.n_contexts)
    rr, lab, q = rows[:, None], pair.clean.label_pos[:, :-1], pair.query_pos

    def setter(act, index, clean):
        _, i = index
        if kind == "head_out_readout":
            act[rows, q, i] = clean[rows, q, i]
        elif kind == "head_pattern_label":
            act[rr, i, :, lab] = clean[rr, i, :, lab]
        else:
            act[rr, lab, i] = clean[rr, lab, i]
        return act

    act = {"head_v_label": "v", "head_pattern_label": "pattern"}.get(kind, "z")
    metric = helpers.tl_metric(loaded, pair)
    recv, donor = (pair.corrupted, pair.clean) if direction == "denoise" else (pair.clean, pair.corrupted)
    m = loaded.model
    with torch.no_grad():
        _, cache = m.run_with_cache(donor.tokens)
        return tlp.generic_activation_patch(
            m, recv.tokens, cache, metric, setter, act, index_axis_names=("layer", "head")
        )


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("kind", ["head_out_readout", "head_out_label", "head_v_label", "head_pattern_label"])
@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
def test_label_and_readout_kinds_equal_generic_tl_patching(tiny, toy, model, kind, direction):
    loaded = tiny if model == "tiny" else helpers.tiny_hf("llama")
    pair = pair_for(loaded, toy, 3, 5)
    patcher = Patcher(loaded.model, pair)
    ours = patcher.sweep(kind, direction)
    ref = _tl_generic(loaded, pair, kind, direction, patcher)[:, : ours.values.shape[1]]
    helpers.assert_patch_close(ours, ref)  # tiny-llama's pair is ill-conditioned: |clean - corrupted| = 0.00093
    if kind == "head_out_readout" and model == "tiny-llama":
        assert patcher.stepper("corrupted").mode == "kv"


# seed 244 on llama: |clean - corrupted| = 4.9e-5 logits, normalised values reach 409, float32 noise 0.2 there
@pytest.mark.parametrize("arch,seed", [("llama", 0), ("gemma3", 0), ("llama", 244)])
def test_block_skipping_exact_on_hf_architectures(toy, arch, seed):
    loaded = helpers.tiny_hf(arch)
    pair = pair_for(loaded, toy, 3, 5, seed=seed)
    patcher = Patcher(loaded.model, pair)
    for kind in ("resid", "head_out"):
        ours = patcher.sweep(kind, "denoise")
        ref = tl_reference(loaded, pair, kind, "denoise", patcher)[:, : ours.values.shape[1]]
        helpers.assert_patch_close(ours, ref)  # in logits of raw logit difference, not on the normalised scale


def test_patching_every_head_recovers_clean_and_nothing_gives_zero(tiny, toy):
    pair = pair_for(tiny, toy, 4, 6)
    patcher = Patcher(tiny.model, pair)
    L, H = tiny.model.cfg.n_layers, tiny.model.cfg.n_heads
    every = [(l, h) for l in range(L) for h in range(H)]
    tol = helpers.normalised_tolerance(patcher.baseline("clean"), patcher.baseline("corrupted"), 1e-5)
    for where in ("all", "readout"):
        assert patcher.patch_heads(every, "denoise", where) == pytest.approx(1.0, abs=tol)
        assert patcher.patch_heads(every, "noise", where) == pytest.approx(0.0, abs=tol)
        assert patcher.patch_heads([], "denoise", where) == pytest.approx(0.0, abs=tol / 10)
        assert patcher.patch_heads([], "noise", where) == pytest.approx(1.0, abs=tol / 10)
    res = patcher.sweep("resid", "denoise")
    first_diff = int((pair.clean.tokens != pair.corrupted.tokens).any(0).nonzero().min())
    assert torch.equal(res.values[:, :first_diff], torch.zeros(L, first_diff))  # no-op cells: exactly 0
    assert not res.computed[:, :first_diff].any() and res.computed[0, first_diff]


def test_readout_stepper_kv_equals_full_forward(toy):
    # sliding_window=8: prompts longer than the window; the cache keeps every position, the steps' masks apply it
    for loaded in (helpers.tiny_hf("llama"), helpers.tiny_hf("gemma3"), helpers.tiny_hf("gemma3", sliding_window=8)):
        b = helpers.batch(loaded, toy, "flipped", n_contexts=3, n_examples=6)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to full forwards
            st = ReadoutStepper(loaded.model, b)
        assert st.mode == "kv"
        ref = ReadoutStepper(loaded.model, b, mode="full")
        masks = torch.rand(5, 2, 4, generator=torch.Generator().manual_seed(0)) > 0.5
        masks = torch.cat([masks, head_masks([[(1, 0)], [(1, 2), (1, 3)]], 2, 4)])  # these re-run from block 1
        for src in (None, st.z.mean(0), st.z * 0.5):
            assert torch.allclose(st.run(masks, src), ref.run(masks, src), atol=1e-4)
        assert torch.allclose(st.base_logits, helpers.full_label_logits(loaded, b)[:, -1], atol=1e-4)


# ------------------------------------------------------------ attribution ---


@pytest.mark.parametrize("direction,max_rows", [("denoise", 4), ("noise", 4), ("denoise", 3), ("noise", 1)])
def test_attribution_equals_exact_on_a_linear_model(toy, direction, max_rows):
    lin = helpers.linear_model()
    pair = pair_for(lin, toy, 4, 6)
    patcher = Patcher(lin.model, pair)
    kinds = ("head_out", "head_out_readout", "head_out_label", "attn_out")
    est = attribution_patch(lin.model, pair, kinds, direction, max_rows=max_rows)  # 3, 1: several chunks
    for kind in kinds:
        exact = patcher.sweep(kind, direction)
        helpers.assert_patch_close(exact, est[kind].values)  # |clean - corrupted| = 0.0019 here: raw LD units
    assert est["head_out"].effect.abs().max() > 1e-3  # the test is not vacuous


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_in_chunks_of_contexts_equals_one_chunk(tiny, toy, direction):
    pair = pair_for(tiny, toy, 5, 6)
    kinds = ("head_out", "head_out_label", "head_pattern_label", "resid")
    whole = attribution_patch(tiny.model, pair, kinds, direction, max_rows=5)
    for max_rows in (1, 2):
        parts = attribution_patch(tiny.model, pair, kinds, direction, max_rows=max_rows)
        for kind in kinds:
            assert torch.allclose(parts[kind].values, whole[kind].values, atol=1e-5), (kind, max_rows)
            if whole[kind].by_pos is not None:
                assert torch.allclose(parts[kind].by_pos, whole[kind].by_pos, atol=1e-5), (kind, max_rows)
    assert (whole["head_out"].values - whole["head_out"].values.mean()).abs().max() > 1e-4  # cells differ
    with pytest.raises(ValueError, match="max_rows"):
        attribution_patch(tiny.model, pair, kinds, direction, max_rows=0)


def test_attribution_agreement_on_tiny(tiny, toy):
    pair = pair_for(tiny, toy, 4, 6)
    est = attribution_patch(tiny.model, pair, ("head_out", "resid"))
    exact = Patcher(tiny.model, pair).sweep("head_out")
    agr = agreement(est["head_out"].values, exact.values, k=3)
    assert set(agr) == {"spearman", "pearson", "topk_overlap", "k"}
    assert -1 <= agr["spearman"] <= 1 and 0 <= agr["topk_overlap"] <= 1
    assert est["head_out"].by_pos.shape == (2, 4, pair.query_pos.max() + 1)
    assert est["resid"].values.shape[0] == 2


# ------------------------------------------------------------ tables, CLI ---


def test_tables_and_files(tiny, toy, tmp_path):
    pair = pair_for(tiny, toy, 2, 4)
    patcher = Patcher(tiny.model, pair)
    res = [patcher.sweep("resid"), patcher.sweep("head_out", "noise")]
    t = res[0].table()
    assert {"layer", "pos", "value", "effect", "role", "computed"} <= set(t.columns)
    assert len(t) == res[0].values.numel()
    write_patch_results(RunFolder(tmp_path), res)
    assert (tmp_path / "resid_denoise.png").exists() and (tmp_path / "head_out_noise.csv").exists()
    assert len(pd.read_csv(tmp_path / "patching.csv")) == sum(r.values.numel() for r in res)
    assert set(KINDS) >= {
        "resid",
        "attn_out",
        "mlp_out",
        "head_out",
        "head_out_label",
        "head_out_readout",
        "head_v_label",
        "head_pattern_label",
    }


def test_cli_patch_on_tiny(tmp_path, capsys):
    from mechicl.cli import main

    rc = main(
        [
            "patch",
            "--model",
            "tiny",
            "--task",
            "toy",
            "--kinds",
            "head_out,resid",
            "--n-contexts",
            "2",
            "--k",
            "3",
            "--direction",
            "both",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    assert (tmp_path / "head_out_denoise.png").exists() and (tmp_path / "resid_noise.csv").exists()
    assert (tmp_path / "summary.md").exists()
    assert "head_out" in capsys.readouterr().out
    assert main(["patch", "--model", "tiny", "--task", "toy", "--kinds", "bogus", "--out", str(tmp_path)]) == 2


# ------------------------------------------------------------ real model ---


@pytest.mark.real_model
def test_exact_patching_equals_transformer_lens_real(real):
    task = load_task("vader-words")
    pair = pair_for(real, task, 2, 3)
    patcher = Patcher(real.model, pair)
    ours = patcher.sweep("head_out", "denoise")
    ref = helpers.tl_head_out_at(real, pair, "denoise")  # every head of 3 layers; every layer on the tiny models
    helpers.assert_patch_close(ours, ref, layers=helpers.REAL_LAYERS)
    res = patcher.sweep("resid", "noise")
    metric = helpers.tl_metric(real, pair)
    cells = [(l, p) for l in (0, 17) for p in range(0, patcher.width, 2)]  # one TL forward (full vocabulary) each
    idx = pd.DataFrame(cells, columns=["layer", "pos"])
    with torch.no_grad():
        _, cache = real.model.run_with_cache(pair.corrupted.tokens)
        tl = tlp.generic_activation_patch(
            real.model, pair.clean.tokens, cache, metric, tlp.layer_pos_patch_setter, "resid_pre", index_df=idx
        )
    at = res.values[torch.tensor(idx["layer"].to_numpy()), torch.tensor(idx["pos"].to_numpy())]
    assert torch.allclose(at, tl, rtol=0, atol=helpers.normalised_tolerance(res.clean_ld, res.corrupted_ld))


@pytest.mark.real_model
def test_all_heads_recover_clean_and_stepper_is_kv_on_real(real):
    task = load_task("vader-words")
    pair = pair_for(real, task, 2, 4)
    patcher = Patcher(real.model, pair)
    every = [(l, h) for l in range(18) for h in range(4)]
    tol = helpers.normalised_tolerance(patcher.baseline("clean"), patcher.baseline("corrupted"))
    assert patcher.patch_heads(every, "denoise", "all") == pytest.approx(1.0, abs=tol)
    assert patcher.patch_heads(every, "denoise", "readout") == pytest.approx(1.0, abs=tol)
    assert patcher.patch_heads([], "denoise", "all") == pytest.approx(0.0, abs=tol / 100)
    assert patcher.stepper("corrupted").mode == "kv"
