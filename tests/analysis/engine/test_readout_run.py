"""``ReadoutRun``: one forward per context read by several analyses. Reading it must give what each analysis
computes with its own forward (lens, DLA, attention rows and views, patching caches), and misuse must fail loudly."""

from __future__ import annotations

import pytest
import torch

from mechicl.analysis.engine.hooks import FINAL, act_name
from mechicl.analysis.engine.readout import readout_run
from mechicl.analysis.engine.surgery import count_block_calls
from mechicl.analysis.inside import attention, dla, lens
from mechicl.analysis.patching.exact import Patcher
from mechicl.data.pairs import pair_from_batches
from mechicl.errors import PairError
from tests import helpers


@pytest.fixture(scope="module")
def shared(tiny):
    task = helpers.toy_task(n_classes=3)
    kw = dict(n_contexts=5, n_examples=6, seed=3)
    bd, bf = helpers.batch(tiny, task, "default", **kw), helpers.batch(tiny, task, "flipped", **kw)
    m = tiny.model
    names = list(dict.fromkeys(attention.pattern_names(m) + lens.lens_names(m) + dla.dla_names(m) + [FINAL]))
    full = attention.pattern_names(m) + [act_name(k, l) for k in ("z", "resid_pre") for l in range(m.cfg.n_layers)]
    runs = [readout_run(m, b, names, batch_size=3, progress=False, full_names=full, full_rows=3) for b in (bd, bf)]
    return bd, bf, runs


def test_analyses_read_the_run_as_their_own_forward(tiny, shared):
    bd, _, (rd, _) = shared
    m = tiny.model
    assert torch.equal(lens.lens_logits(m, bd, 3, False), lens.lens_logits(m, bd, 3, False, run=rd))
    assert torch.equal(attention.readout_patterns(m, bd, 3, False), attention.readout_patterns(m, bd, 3, False, run=rd))
    own, read = dla.direct_logits(m, bd, 3, False), dla.direct_logits(m, bd, 3, False, run=rd)
    assert own.names == read.names and torch.equal(own.contrib, read.contrib) and torch.equal(own.logits, read.logits)
    heads = [(0, 1), (1, 0)]
    torch.testing.assert_close(
        attention.context_patterns(m, bd, 1, heads, run=rd),
        attention.context_patterns(m, bd, 1, heads),
        atol=1e-6,
        rtol=0,
    )


def test_run_misuse_is_named(tiny, shared):
    bd, bf, (rd, _) = shared
    with pytest.raises(ValueError, match="another batch"):
        lens.lens_logits(tiny.model, bf, 3, False, run=rd)
    small = readout_run(tiny.model, bd, [FINAL], batch_size=3, progress=False)
    with pytest.raises(ValueError, match="did not keep"):
        lens.lens_logits(tiny.model, bd, 3, False, run=small)
    with pytest.raises(ValueError, match="first chunk"):
        readout_run(tiny.model, bd, [FINAL], batch_size=2, progress=False, full_names=[FINAL], full_rows=3)


def test_a_primed_patcher_sweeps_as_a_fresh_one_without_its_cached_forwards(tiny, shared):
    bd, bf, runs = shared
    rows = slice(0, 3)
    pair = pair_from_batches(bd.select(rows), bf.select(rows))
    fresh, primed = Patcher(tiny.model, pair), Patcher(tiny.model, pair)
    primed.prime("clean", runs[0])
    primed.prime("corrupted", runs[1])
    for kind in ("head_out", "head_out_label", "resid"):
        a, b = fresh.sweep(kind), primed.sweep(kind)
        torch.testing.assert_close(b.logit_diff, a.logit_diff, atol=1e-5, rtol=0)
        assert torch.equal(a.computed, b.computed)  # the same no-op cells were skipped
    assert fresh.forwards - primed.forwards >= 2  # the fresh patcher's cached forwards; the primed one ran none
    names = [act_name(k, l) for k in ("z", "resid_pre") for l in range(tiny.model.cfg.n_layers)]
    with count_block_calls(tiny.model) as n:
        for which in ("clean", "corrupted"):
            primed.cached(which, names)
            primed.baseline(which)
    assert n["calls"] == 0
    other = pair_from_batches(bd.select(slice(1, 4)), bf.select(slice(1, 4)))
    with pytest.raises(PairError, match="not this pair"):
        Patcher(tiny.model, other).prime("clean", runs[0])


def test_a_hook_that_never_fires_is_absent_as_in_a_plain_forward():
    """Gemma-3's ``hook_pos_embed`` exists but never fires (rotary positions); DLA asks for it all the same."""
    g = helpers.tiny_hf("gemma3")
    b = helpers.batch(g, helpers.toy_task(), n_contexts=3)
    run = readout_run(g.model, b, dla.dla_names(g.model), batch_size=2, progress=False)
    assert "hook_pos_embed" in run.requested and "hook_pos_embed" not in run.names()
    own, read = dla.direct_logits(g.model, b, 2, False), dla.direct_logits(g.model, b, 2, False, run=run)
    assert own.names == read.names and torch.equal(own.contrib, read.contrib)
