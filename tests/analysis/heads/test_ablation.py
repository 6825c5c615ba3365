"""Head ablation at the readout slot, gap reduction, the seeded random control, FV effects and the head finder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mechicl.analysis.engine.hooks import head_masks, run_to_final
from mechicl.analysis.engine.readout import unembed_labels
from mechicl.analysis.heads.ablation import HeadAblator, gap_reduction, summarize_control
from mechicl.analysis.heads.old_finder import HeadFinderConfig
from mechicl.data.batches import ablation_batches, shuffled_labels
from mechicl.data.prompts import sample_contexts
from mechicl.runs.heads import find_heads_for, write_heads
from tests import helpers


def _ablator(loaded, toy, n=6, k=6, seed=0):
    ids = sample_contexts(toy, n, k, seed=seed)
    batches = ablation_batches(
        toy, loaded.tokenizer, ids, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos, seed=seed
    )
    return HeadAblator(loaded.model, batches)


def test_gap_reduction_formula():
    assert gap_reduction(0.9, 0.5, 0.9) == pytest.approx(1.0)
    assert gap_reduction(0.9, 0.5, 0.5) == pytest.approx(0.0)
    assert gap_reduction(0.9, 0.5, 0.7) == pytest.approx(0.5)
    assert gap_reduction(0.9, 0.5, 0.3) == pytest.approx(-0.5)
    assert np.isnan(gap_reduction(0.5, 0.5, 0.9)) and np.isnan(gap_reduction(0.4, 0.5, 0.9))
    np.testing.assert_allclose(gap_reduction(1.0, 0.0, np.array([0.0, 0.25, 1.0])), [0.0, 0.25, 1.0])


def test_summarize_control():
    s = summarize_control(0.5, np.array([0.0, 0.1, 0.2, 0.6, np.nan]))
    assert s["n_draws"] == 4 and s["control_mean"] == pytest.approx(0.225)
    assert s["control_p"] == pytest.approx((1 + 1) / 5)
    assert s["control_ci_low"] <= s["control_mean"] <= s["control_ci_high"]


def test_shuffled_labels_permute_demonstrations_only(tiny, toy):
    b = helpers.batch(tiny, toy, "default", n_contexts=5, n_examples=8)
    s = shuffled_labels(b, seed=3)
    assert torch.equal(s[:, -1], b.true_labels[:, -1])
    assert torch.equal(s[:, :-1].sort(-1).values, b.true_labels[:, :-1].sort(-1).values)
    assert torch.equal(s, shuffled_labels(b, seed=3)) and not torch.equal(s, shuffled_labels(b, seed=4))


@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
def test_ablation_equals_hooked_full_forward(tiny, toy, model):
    """Readout-slot ablation via the stepper equals a plain hooked forward that ablates at the query slot."""
    loaded = tiny if model == "tiny" else helpers.tiny_hf("llama")
    abl = _ablator(loaded, toy)
    heads = [(0, 1), (1, 3)]
    for kind in ("zero", "mean"):
        logits = abl.flipped.run(head_masks([heads], 2, 4), None if kind == "zero" else abl.mean_z)[0]
        b = abl.flipped.batch
        rows, q = torch.arange(b.n_contexts), b.readout_pos[:, -1]

        def make(l):
            def hook(z, hook):
                z = z.clone()
                for ll, h in heads:
                    if ll == l:
                        z[rows, q, h] = 0.0 if kind == "zero" else abl.mean_z[l, h]
                return z

            return hook

        with torch.no_grad():
            resid = run_to_final(loaded.model, b.tokens, [(f"blocks.{l}.attn.hook_z", make(l)) for l in (0, 1)])
            ref = unembed_labels(loaded.model, resid[rows, q], b.label_token_ids)
        assert torch.allclose(logits, ref, atol=1e-4)
    assert abl.flipped.mode == ("kv" if model == "tiny-llama" else "full")


def test_random_control_is_reproducible_given_a_seed(tiny, toy):
    abl = _ablator(tiny, toy)
    a = abl.random_control(2, 12, seed=5, exclude=[(1, 0)])
    b = abl.random_control(2, 12, seed=5, exclude=[(1, 0)])
    c = abl.random_control(2, 12, seed=6, exclude=[(1, 0)])
    pd.testing.assert_frame_equal(a, b)
    assert list(a.heads) != list(c.heads)
    assert not a.heads.str.contains("L1H0").any()
    assert (a["size"] == 2).all() and len(a) == 12
    one = abl.random_control(1, 3, exclude=[(1, 0)])  # size 1: every other head once, exactly
    assert sorted(one.heads) == sorted(f"L{l}H{h}" for l in range(2) for h in range(4) if (l, h) != (1, 0))
    few = abl.random_control(3, 100, exclude=[(1, 0)])  # C(7, 3) = 35 <= 100 sets: each once
    assert len(few) == 35 and few.heads.nunique() == 35


def test_gap_table_and_function_vectors(tiny, toy):
    abl = _ablator(tiny, toy, n=8)
    t = abl.gap_table([[(0, 0)], [(0, 0), (1, 2)]], "mean", n_boot=50)
    assert list(t.columns[:3]) == ["heads", "size", "ablation"]
    assert {
        "gap_reduction",
        "gap_reduction_ci_low",
        "gap_reduction_ci_high",
        "d_acc_correct",
        "d_acc_zero_shot",
        "acc_flipped_ablated",
    } <= set(t.columns)
    # zero-shot: the query alone (k = 0), ablated at its readout slot; no ablation changes nothing
    zs = abl.zero_shot.batch
    assert zs.example_ids.shape[1] == 1 and torch.equal(zs.example_ids[:, 0], abl.batches.correct.example_ids[:, -1])
    assert abl.gap_table([[]], "mean", n_boot=0).d_acc_zero_shot.iloc[0] == 0
    empty = abl.ablate([[]], "zero")
    np.testing.assert_array_equal(empty["flipped"]["correct"][0], abl.base["flipped"]["correct"])
    fv = abl.function_vector_effects()
    assert len(fv) == 8 and np.isfinite(fv.fv_cie).all()
    assert (fv.fv_cie_ci_low <= fv.fv_cie + 1e-12).all()


def test_find_heads_end_to_end_on_tiny(tiny, toy, tmp_path):
    cfg = HeadFinderConfig(
        "tiny", "toy", n_examples=6, n_screen=4, n_eval=8, n_candidates=4, set_sizes=(1, 2), n_control=10, seed=0
    )
    res = find_heads_for(tiny, toy, cfg, progress=False)
    assert list(res.heads["rank"]) == [1, 2, 3, 4] and len(res.top_heads) == 4
    assert res.heads.patch_denoise.is_monotonic_decreasing
    assert {
        "gap_reduction_zero",
        "gap_reduction_mean",
        "d_acc_correct_mean",
        "d_acc_zero_shot_mean",
        "fv_cie",
        "patch_noise",
        "readout_patch_denoise",
        "control_ci_high",
        "control_p",
    } <= set(res.heads.columns)
    assert len(res.all_heads) == 8 and res.all_heads.candidate.sum() == 4
    assert list(res.sets["size"]) == [1, 2]
    assert {"control_mean", "control_ci_low", "control_ci_high", "control_p", "d_acc_zero_shot"} <= set(
        res.sets.columns
    )
    assert len(res.control) == 7 + 10  # size 1: the 7 other heads; size 2: 10 random draws
    # each candidate's control is every other head's single-head gap reduction (all_heads)
    gr = res.all_heads.set_index(["layer", "head"]).gap_reduction
    for r in res.heads.itertuples():
        assert np.isclose(gr[(r.layer, r.head)], r.gap_reduction_mean, equal_nan=True)
        others = gr.drop((r.layer, r.head)).dropna().to_numpy()
        if len(others) and np.isfinite(r.gap_reduction_mean):
            assert np.isclose(r.control_p, (1 + (others >= r.gap_reduction_mean).sum()) / (1 + len(others)))
    write_heads(res, tmp_path)
    assert (tmp_path / "heads.csv").exists() and (tmp_path / "attribution.png").exists()
    assert "Label-aggregation heads" in (tmp_path / "summary.md").read_text()
    again = find_heads_for(tiny, toy, cfg, progress=False)
    pd.testing.assert_frame_equal(res.control, again.control)


def test_cli_heads_on_tiny(tmp_path, capsys):
    from mechicl.cli import main

    rc = main(
        [
            "heads",
            "--model",
            "tiny",
            "--task",
            "toy",
            "--k",
            "4",
            "--n-screen",
            "3",
            "--n-eval",
            "6",
            "--candidates",
            "3",
            "--set-sizes",
            "1,2",
            "--n-control",
            "5",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    assert (tmp_path / "sets.csv").exists() and (tmp_path / "summary.md").exists()
    assert "| rank | head |" in capsys.readouterr().out
