"""Held-out stage draws: disjoint pools, recorded seeds, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from mechicl.data.batches import STAGES, stage_draws
from mechicl.errors import PromptError
from tests import helpers


def test_stages_never_share_a_context_or_an_example():
    task = helpers.toy_task(3, n=120)
    d = stage_draws(task, {"screen": 5, "confirm": 6, "validate": 7}, n_examples=8, seed=3)
    assert tuple(d.ids) == STAGES and [d.ids[s].shape for s in STAGES] == [(5, 8), (6, 8), (7, 8)]
    rows = [set(d.ids[s].reshape(-1).tolist()) for s in STAGES]
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    assert d.shared_examples() == set()
    for s in STAGES:  # each context has distinct rows from its own pool
        assert all(len(set(r.tolist())) == 8 for r in d.ids[s])
        assert rows[STAGES.index(s)] <= set(d.pools[s])
    labels = np.asarray(task.labels)
    for s in STAGES:  # the pools stay class-balanced
        counts = np.bincount(labels[list(d.pools[s])], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert len(set(d.seeds.values())) == 3


def test_stage_draws_are_reproducible_and_seeded():
    task = helpers.toy_task(2, n=90)
    a = stage_draws(task, {"screen": 4, "confirm": 4, "validate": 4}, 6, seed=1)
    b = stage_draws(task, {"screen": 4, "confirm": 4, "validate": 4}, 6, seed=1)
    c = stage_draws(task, {"screen": 4, "confirm": 4, "validate": 4}, 6, seed=2)
    assert all((a.ids[s] == b.ids[s]).all() for s in STAGES)
    assert any((a.ids[s] != c.ids[s]).any() for s in STAGES)


def test_a_pool_smaller_than_a_context_is_a_clear_error():
    task = helpers.toy_task(2, n=30)
    with pytest.raises(PromptError, match="lower --k"):
        stage_draws(task, {"screen": 2, "confirm": 2, "validate": 2}, n_examples=12)
