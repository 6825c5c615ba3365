"""The prior-head finder against planted ground truth (the constructed organisms' prior carrier, known from the
recipe, never from the finder), and its support measure against hooked forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechicl.analysis.engine.hooks import run_to_final
from mechicl.analysis.engine.readout import unembed_labels
from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.analysis.heads.ablation import HeadAblation, derangements
from mechicl.analysis.prior.prior_heads import screen_and_confirm, validate_prior_heads, zero_shot_support
from mechicl.analysis.stats import mean_ci
from mechicl.data.batches import held_out_batches, query_batch, stage_draws
from mechicl.data.tasks import load_task
from mechicl.models.constructed import planted
from mechicl.models.loading import load_model
from mechicl.models.registry import CONSTRUCTED


@pytest.fixture(scope="module")
def organism_task():
    return load_task("organism")


def _find(name, task):
    lm = load_model(name)
    draws = stage_draws(task, {"screen": 6, "confirm": 6, "validate": 24}, 9, seed=3)
    kw = dict(n_ctx=lm.n_ctx, prepend_bos=lm.prepend_bos)
    q = {s: ReadoutStepper(lm.model, query_batch(task, lm.tokenizer, draws.pools[s], **kw)) for s in draws.ids}
    tab, top = screen_and_confirm(q["screen"], q["confirm"], n_candidates=4, n_top=2, n_boot=300)
    b = held_out_batches(task, lm.tokenizer, draws, **kw)
    abl = HeadAblation(lm.model, *b.stages["validate"], 4, mode="interchange")
    val = validate_prior_heads(
        lm.model, q["validate"], abl, top, mean_ci(abl.gap, n_boot=300)[1], n_boot=300, n_perm=500
    )
    return tab, val


@pytest.mark.parametrize("name", list(CONSTRUCTED))
def test_the_planted_prior_carrier_is_found_and_nothing_else(name, organism_task):
    """Precision and recall 1 on every constructed organism: the one prior head found is the prior carrier L0H2,
    above its matched controls, with the role "prior"; the readers (label heads) and the class heads are not."""
    tab, val = _find(name, organism_task)
    found = set(val.heads[val.prior_head])
    assert found == set(planted(name).prior_carriers), (name, val[["heads", "support", "diff", "role"]])
    assert tab.heads.iloc[0] == "L0H2"  # confirmed first


def test_support_equals_hooked_forwards(organism_task):
    lm = load_model("constructed")
    zb = query_batch(organism_task, lm.tokenizer, range(0, 40, 3), n_ctx=lm.n_ctx, prepend_bos=lm.prepend_bos)
    zs = ReadoutStepper(lm.model, zb)
    got = zero_shot_support(zs, [[(0, 2)], [(1, 2), (0, 1)]], n_resample=2, seed=5)
    rows, q = torch.arange(zb.n_contexts), zb.readout_pos[:, -1]

    def log_odds(heads, donor):
        def hook(z, hook):
            z = z.clone()
            l = int(hook.name.split(".")[1])
            for ll, h in heads:
                if ll == l:
                    z[rows, q, h] = z[donor, q[donor], h] if donor is not None else z[rows, q, h]
            return z

        with torch.no_grad():
            resid = run_to_final(lm.model, zb.tokens, [(f"blocks.{l}.attn.hook_z", hook) for l in range(2)])
            return unembed_labels(lm.model, resid[rows, q], zb.label_token_ids).double().log_softmax(-1)

    base = log_odds([], None)
    ans = base.argmax(-1)
    lo = lambda lg: (lg[rows, ans] - lg.scatter(-1, ans[:, None], -np.inf).max(-1).values).numpy()  # noqa: E731
    for i, heads in enumerate([[(0, 2)], [(1, 2), (0, 1)]]):
        ref = np.mean([lo(log_odds(heads, d)) for d in derangements(zb.n_contexts, 2, 5)], 0)
        np.testing.assert_allclose(got[i], lo(base) - ref, atol=1e-5)
    assert np.abs(got[0]).max() > 0.1  # the prior carrier moves the zero-shot answer: the check can fail
