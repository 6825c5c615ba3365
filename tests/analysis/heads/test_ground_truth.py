"""Ground truth of the organisms from weights and path patching (no ablation), and the head finder ranked on it.

The ground-truth readers come from ``analysis.heads.ground_truth`` on 32 contexts of seed 1 (their path
effects are checked against the brute-force path-patching reference). The finder
(``find_label_heads``, 4 candidates for 8 heads) runs on its own disjoint stage draws of seed 0
and must rank the top reader first and validate it above its matched controls. Measured
(docs/organism.md): with mean or zero ablation it does on every pruned seed with a flipped-label
effect; with the default resample ablation it misses organism-strong's reader (an expected failure,
strict: it fails loudly once the finder changes).
"""

from __future__ import annotations

import re

import pytest

from mechicl.analysis.heads.finder import FindingsConfig, find_label_heads
from mechicl.analysis.heads.ground_truth import ground_truth_readers
from mechicl.analysis.patching.exact import Patcher
from mechicl.data.batches import held_out_batches, stage_draws
from mechicl.data.pairs import pair_for
from mechicl.data.tasks import load_task
from mechicl.models.loading import load_model
from tests.analysis.patching.test_paths import brute_force

FLIPPING = ("organism-strong", "organism-mid", "organism-mid-s1", "organism-mid-s2")  # pruned, flipped-label ICL
PRUNED = (*FLIPPING, "organism-strong-s1", "organism-strong-s2")  # s1, s2: the strong recipe never flips
UNPRUNED = "organism-strong-unpruned"
CFG = FindingsConfig(
    k=10,
    k_min=4,
    n_screen=6,
    n_confirm=6,
    n_validate=12,
    n_candidates=4,
    n_top=2,
    n_control=3,
    ablation="mean",
    n_boot=300,
    n_perm=300,
)


@pytest.fixture(scope="module")
def task():
    return load_task("organism")


@pytest.fixture(scope="module")
def truths(task):
    """Per organism: (loaded, pair, ground truth) on 32 contexts of seed 1 (k = 16)."""
    out = {}
    for name in (*PRUNED, UNPRUNED):
        loaded = load_model(name)
        pair = pair_for(loaded, task, 32, 17, seed=1)
        out[name] = (loaded, pair, ground_truth_readers(loaded.model, Patcher(loaded.model, pair)))
    return out


def _finder(loaded, task, cfg):
    draws = stage_draws(task, cfg.sizes, cfg.k + 1, seed=0)
    batches = held_out_batches(task, loaded.tokenizer, draws, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    return find_label_heads(loaded.model, batches, cfg, progress=False)


@pytest.mark.parametrize("name", PRUNED)
def test_pruned_organisms_weights_and_paths_name_the_same_single_reader(truths, name):
    loaded, pair, gt = truths[name]
    assert gt.has_effect and len(gt.live) == 1 and gt.readers == gt.live, gt.paths
    dead = gt.paths[~gt.paths["live"]]
    assert (dead["effect"].abs() < 1e-6).all()  # W_O = 0: no path passes through a pruned head
    best = gt.paths[gt.paths["reader"]].iloc[0]
    sender = tuple(int(x) for x in re.fullmatch(r"L(\d+)H(\d+)", best["sender"]).groups())
    ref = brute_force(loaded, pair, sender, gt.readers[0], best["input"], "all", "denoise", mlps="recomputed")
    assert abs(ref - best["effect"]) <= 1e-5  # the criterion's number is the path-patching definition's


def test_the_unpruned_organism_reads_labels_with_live_last_layer_heads(truths):
    _, _, gt = truths[UNPRUNED]
    assert len(gt.live) == 4 and gt.readers, gt.paths  # nothing pruned; label information reaches the last layer
    effects = gt.paths.set_index("head").loc[[h for _, h in gt.readers], "effect"].to_numpy()
    assert (effects[:-1] >= effects[1:]).all()


@pytest.mark.parametrize("name", FLIPPING)
def test_the_finder_ranks_the_ground_truth_reader_first_and_above_control(truths, task, name):
    """n_candidates (4) < 8 heads; ranking by anything unrelated to the reader (e.g. layer 0 first) fails."""
    loaded, _, gt = truths[name]
    r = _finder(loaded, task, CFG)
    assert r.has_effect and len(r.confirm) == CFG.n_candidates < 8
    top = (int(r.confirm.layer[0]), int(r.confirm["head"][0]))
    assert top == gt.readers[0], (name, gt.rule, r.confirm[["layer", "head", "effect"]])
    row = r.validate.set_index("heads").loc[f"L{top[0]}H{top[1]}"]
    assert row["above_control"] and row["effect_ci_low"] > row["control_max"], r.validate


def test_on_the_unpruned_organism_the_finders_top_head_is_a_reader(truths, task):
    loaded, _, gt = truths[UNPRUNED]
    r = _finder(loaded, task, CFG)
    top = (int(r.confirm.layer[0]), int(r.confirm["head"][0]))
    assert top in gt.readers and bool(r.validate.above_control[0]), (gt.rule, r.confirm)


@pytest.mark.xfail(
    strict=True,
    reason="measured: resample ablation (same-condition donors) leaves organism-strong's "
    "reader L1H1 at screen effect 0.006 and ranks layer-0 heads first (docs/organism.md)",
)
def test_the_resample_finder_ranks_organism_strongs_reader_first(truths, task):
    """Resample ablation, the default before the ground-truth benchmark chose interchange: its miss stays visible."""
    loaded, _, gt = truths["organism-strong"]
    r = _finder(loaded, task, FindingsConfig(**{**CFG.__dict__, "ablation": "resample"}))
    assert (int(r.confirm.layer[0]), int(r.confirm["head"][0])) == gt.readers[0]


def test_a_pruned_head_is_never_above_control(truths, task):
    """W_O = 0 means effect 0 exactly: beating controls whose mean is negative must not count (the floor)."""
    loaded, _, gt = truths["organism-strong-s1"]
    r = _finder(loaded, task, FindingsConfig(**{**CFG.__dict__, "n_top": 4}))
    last = int(loaded.model.cfg.n_layers) - 1  # gt.live: the last layer's heads with W_O != 0
    dead = [
        f"L{l}H{h}" for l, h in zip(r.validate.layer, r.validate["head"]) if l == last and (last, int(h)) not in gt.live
    ]
    assert dead, r.validate  # the check is exercised: a pruned head reached validation
    v = r.validate.set_index("heads").loc[dead]
    assert (v["effect"].abs() < 1e-9).all() and (v["diff_ci_low"] > 0).any()  # the old rule would have passed them
    assert not v["above_control"].any(), v[["effect", "diff", "above_control"]]
