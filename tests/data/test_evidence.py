"""Evidence schedules: which demonstrations carry flipped labels, and renderings that differ only there."""

from __future__ import annotations

import pytest
import torch

from mechicl.data.evidence import evidence_batches, flip_mask
from mechicl.data.prompts import LABEL, sample_contexts
from mechicl.errors import PromptError


def test_placements_by_hand():
    assert flip_mask(6, 2, "last")[0].tolist() == [False] * 4 + [True] * 2
    assert flip_mask(6, 2, "first")[0].tolist() == [True] * 2 + [False] * 4
    assert flip_mask(6, 3, "spread")[0].tolist() == [False, True] * 3  # every other one, like default>flipped@alt
    assert flip_mask(6, 1, "spread")[0].tolist() == [False] * 5 + [True]
    r = flip_mask(6, 4, "random", n_contexts=50, seed=3)
    assert (r.sum(-1) == 4).all() and len({tuple(x.tolist()) for x in r}) > 5  # per-context positions
    with pytest.raises(PromptError, match="count"):
        flip_mask(6, 7, "last")
    with pytest.raises(PromptError, match="placement"):
        flip_mask(6, 1, "middle")


def test_renderings_differ_only_at_flipped_labels(tiny, toy):
    ids = sample_contexts(toy, 3, 6, seed=0)
    ev = evidence_batches(toy, tiny.tokenizer, ids, n_ctx=tiny.n_ctx, prepend_bos=True, placements=("last", "random"))
    k = 5
    assert ev.placement[0] == "none" and ev.placement[-1] == "all" and len(ev.batches) == 2 + 2 * (k - 1)
    base = ev.default
    for b, mask, m in zip(ev.batches, ev.flips, ev.count):
        assert torch.equal(b.example_ids, ids) and int(mask[0].sum()) == m
        flipped = b.shown_labels[:, :k] != b.true_labels[:, :k]
        assert torch.equal(flipped, mask)  # exactly the scheduled demonstrations
        assert torch.equal(b.shown_labels[:, -1], b.true_labels[:, -1])  # the query's own label stays true
        diff = b.tokens != base.tokens
        assert (base.roles[diff] == LABEL).all()  # only label tokens change
        assert int(diff.sum()) == int(mask.sum())
