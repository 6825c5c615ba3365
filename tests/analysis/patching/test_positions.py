"""Label-position patching: every-position patches equal the donor run; per-head parts equal hook-level patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechicl.analysis.patching.exact import Patcher
from mechicl.analysis.patching.positions import (
    PARTS,
    POSITION_SETS,
    patch_head_parts,
    patch_heads_part,
    patch_position_sets,
    position_mask,
)
from mechicl.analysis.stats import shared_row_design_effect
from mechicl.data.pairs import pair_for
from mechicl.data.prompts import INPUT, LABEL
from mechicl.data.tasks import load_task
from mechicl.models.loading import load_model
from tests import helpers


@pytest.fixture(scope="module")
def organism():
    return load_model("organism-strong")


@pytest.fixture(scope="module")
def organism_pair(organism):
    return pair_for(organism, load_task("organism"), 6, 6, seed=3)


def test_position_masks_follow_the_batch_fields(tiny, toy):
    pair = pair_for(tiny, toy, 3, 5, seed=1)
    w = int(pair.query_pos.max()) + 1
    roles = pair.clean.roles[:, :w]
    lab = position_mask(pair, "label", w)
    assert torch.equal(lab, roles == LABEL)  # the query's own label lies after the readout slot
    assert torch.equal(position_mask(pair, "input", w), roles == INPUT)
    ro = position_mask(pair, "readout", w)
    assert ro.sum() == pair.n_contexts and ro[torch.arange(3), pair.query_pos].all()
    assert position_mask(pair, "all", w).all()
    with pytest.raises(ValueError, match="position set"):
        position_mask(pair, "labels", w)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_every_position_recovers_the_donor_run(organism, organism_pair, direction):
    res = patch_position_sets(Patcher(organism.model, organism_pair), direction)
    donor = 1.0 if direction == "denoise" else 0.0
    col = {s: i for i, s in enumerate(POSITION_SETS)}
    torch.testing.assert_close(res.values[:, col["all"]], torch.full((2,), donor), atol=1e-5, rtol=0)
    # at layer 0 only the label tokens differ: patching them all is the donor run; the inputs alone do nothing
    assert abs(float(res.values[0, col["label"]]) - donor) < 1e-5
    assert abs(float(res.values[0, col["input"]]) - (1.0 - donor)) < 1e-5
    df = res.table()
    assert set(df["positions"]) == set(POSITION_SETS) and len(df) == 2 * len(POSITION_SETS)
    assert ((df["ci_low"] <= df["value"] + 1e-6) & (df["value"] <= df["ci_high"] + 1e-6)).all()
    # "all" is the donor run in every context: the ratio is the donor value in every bootstrap draw
    every = df[df["positions"] == "all"]
    assert np.allclose(every[["ci_low", "ci_high"]].to_numpy(), donor, atol=1e-5)
    # any other cell: a brute-force bootstrap loop over contexts (numerator and gap drawn together)
    row = df[(df["positions"] == "label") & (df["layer"] == 1)].iloc[0]
    base = res.corrupted_ld if direction == "denoise" else res.clean_ld
    num, gap = (
        (res.logit_diff[1, col["label"]] - base).double().numpy(),
        (res.clean_ld - res.corrupted_ld).double().numpy(),
    )
    idx = np.random.default_rng(0).integers(0, len(gap), size=(2000, len(gap)))
    draws = [num[i].mean() / gap[i].mean() for i in idx if gap[i].mean() > 0]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    # the organism's contexts share task rows: widened about the ratio of means by sqrt(design effect)
    est, f = num.mean() / gap.mean(), np.sqrt(shared_row_design_effect(organism_pair.clean.example_ids.numpy()))
    lo, hi = np.array([est - f * (est - lo), est + f * (hi - est)]) + (0.0 if direction == "denoise" else 1.0)
    assert (row.ci_low, row.ci_high) == pytest.approx((lo, hi), abs=1e-9)
    untouched = df[(df["positions"] == "input") & (df["layer"] == 0)]  # a no-op patch: zero width at the receiver
    assert np.allclose(untouched[["ci_low", "ci_high"]].to_numpy(), 1.0 - donor, atol=1e-5)


def test_readout_set_equals_the_resid_sweep_cell(organism, organism_pair):
    q = int(organism_pair.query_pos[0])
    assert (organism_pair.query_pos == q).all()
    patcher = Patcher(organism.model, organism_pair)
    ref = patcher.sweep("resid", "denoise", cells=[(1, q)])
    res = patch_position_sets(patcher, "denoise", sets=("readout",))
    torch.testing.assert_close(res.values[1, 0], ref.values[1, q], atol=1e-5, rtol=0)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_head_parts_equal_the_hook_level_sweeps_without_gqa(organism, organism_pair, direction):
    patcher = Patcher(organism.model, organism_pair)
    held = set(patcher.cached("clean", [])) | set(patcher.cached("corrupted", []))
    both = patch_head_parts(patcher, PARTS, direction)
    after = set(patcher.cached("clean", [])) | set(patcher.cached("corrupted", []))
    assert not any(n.endswith(("hook_pattern", "hook_v")) for n in after - held)  # one layer's patterns at a time
    for part, kind, mine in zip(PARTS, ("head_pattern_label", "head_v_label"), both):
        ref = patcher.sweep(kind, direction)  # n_kv_heads == n_heads here, so kv_head == head
        torch.testing.assert_close(mine.values, ref.values, atol=1e-5, rtol=0)
        assert mine.kind == f"head_{part}_label_z"


def test_value_part_isolates_one_query_head_under_gqa(toy):
    loaded = helpers.tiny_hf("llama")  # 4 query heads, 2 KV heads
    pair = pair_for(loaded, toy, 4, 6, seed=2)
    patcher = Patcher(loaded.model, pair)
    kv = patcher.sweep("head_v_label", "denoise")  # [layer, kv_head]
    (per_head,) = patch_head_parts(patcher, ["value"], "denoise")
    for l in range(2):
        for g in range(2):
            group = [(l, 2 * g), (l, 2 * g + 1)]
            both = patch_heads_part(patcher, group, "value", "denoise")
            assert abs(both - float(kv.values[l, g])) < 1e-5
        # one query head alone is not its KV head's patch
        assert not torch.allclose(per_head.values[l, ::2], kv.values[l], atol=1e-4)
    with pytest.raises(ValueError, match="one layer"):
        patch_heads_part(patcher, [(0, 0), (1, 0)], "value")
    with pytest.raises(ValueError, match="sequence of"):
        patch_head_parts(patcher, "value")  # a name, not a sequence of names


def test_value_interval_widens_for_contexts_that_share_task_rows():
    """``value_interval`` with the contexts' task rows: the bootstrap interval widened about the ratio of means by
    sqrt(design effect) of those rows (the offset of noising results kept)."""
    from types import SimpleNamespace

    from mechicl.analysis.patching.positions import value_interval
    from mechicl.analysis.stats import ratio_ci

    rng = np.random.default_rng(1)
    n = 10
    clean, corr = torch.tensor(rng.normal(2, 0.4, n)), torch.tensor(rng.normal(0, 0.4, n))
    ld = torch.tensor(rng.normal(1, 0.5, (2, 3, n)))
    items = np.arange(n * 3).reshape(n, 3) % 6
    for direction, offset in (("denoise", 0.0), ("noise", 1.0)):
        res = SimpleNamespace(direction=direction, logit_diff=ld, clean_ld=clean, corrupted_ld=corr, items=items)
        base = corr if direction == "denoise" else clean
        est, lo, hi = ratio_ci((ld - base).numpy(), (clean - corr).numpy(), n_boot=400)
        f = np.sqrt(shared_row_design_effect(items))
        got_lo, got_hi = value_interval(res, n_boot=400)
        np.testing.assert_allclose(got_lo, est - f * (est - lo) + offset, rtol=1e-6)
        np.testing.assert_allclose(got_hi, est + f * (hi - est) + offset, rtol=1e-6)
        assert f > 1.1
