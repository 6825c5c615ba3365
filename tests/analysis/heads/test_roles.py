"""Roles from label-specific effects: every branch of the decision list by hand, the planted roles of the constructed
organisms recovered, ``with_mode`` equal to a fresh ablation, and control norms after Gemma's post-attention norm
equal a reference built from the norm's input and the Hugging Face weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechicl.analysis.engine.hooks import run_to_final
from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.analysis.heads.ablation import HeadAblation
from mechicl.analysis.heads.roles import ROLES, TOL, assign_roles, head_role, label_specific_effects
from mechicl.analysis.stats import mean_ci
from mechicl.data.batches import held_out_batches, stage_draws
from mechicl.data.names import head_name
from mechicl.data.prompts import build_prompt_batch, sample_contexts
from mechicl.data.tasks import load_task
from mechicl.models.constructed import planted
from mechicl.models.loading import load_model
from tests import helpers


def _row(inter=(0.0, 0.0, 0.0), zs=(0.0, 0.0, 0.0), corr=(0.0, 0.0, 0.0), flip=(0.0, 0.0, 0.0)) -> dict:
    r = {}
    for name, v in (
        ("interchange", inter),
        ("d_p_zero_shot", zs),
        ("ablated_correct", corr),
        ("ablated_flipped", flip),
    ):
        r[name], r[f"{name}_ci_low"], r[f"{name}_ci_high"] = v
    return r


@pytest.mark.parametrize(
    "row, role",
    [
        (_row(inter=(1.0, 0.5, 1.5), zs=(0.01, -0.02, 0.04)), "label"),
        (_row(inter=(1.0, 0.5, 1.5), zs=(-0.2, -0.3, -0.1)), "label+prior"),
        (_row(inter=(1.0, 0.5, 1.5), zs=(-0.04, -0.09, 0.01)), "unresolved"),  # wider than the margin, spans 0
        (_row(inter=(0.1, -0.1, 0.3), zs=(-0.2, -0.3, -0.1)), "prior"),
        (_row(inter=(0.1, -0.1, 0.3), zs=(0.0, -0.01, 0.01), flip=(0.2, 0.1, 0.3)), "class"),
        (_row(inter=(0.1, -0.1, 0.3), zs=(0.0, -0.01, 0.01), corr=(-0.2, -0.3, -0.1)), "class"),
        (_row(inter=(0.1, -0.1, 0.3), zs=(0.0, -0.01, 0.01), corr=(-0.1, -0.2, 0.05)), "generic"),
        (_row(zs=(-0.03, -0.045, -0.01)), "generic"),  # clear of 0 but inside the margin: not a prior carrier
        (_row(inter=(1e-9, 1e-9, 1e-9), flip=(-1e-12, -2e-12, -1e-13)), "generic"),  # round-off is not an effect
    ],
)
def test_every_branch_of_the_decision_list(row, role):
    got, why = head_role(row, margin=0.05)
    assert got == role and got in ROLES and why


def test_the_margin_is_a_share_of_the_gap_and_must_be_positive():
    eff = __import__("pandas").DataFrame([{"heads": "L0H0", **_row(inter=(1.0, 0.5, 1.5), zs=(0.05, 0.01, 0.09))}])
    assert assign_roles(eff, gap_ci_low=0.4).role[0] == "label"  # margin 0.1
    assert assign_roles(eff, gap_ci_low=0.2).role[0] == "label+prior"  # margin 0.05
    with pytest.raises(ValueError, match="CI lies above 0"):
        assign_roles(eff, gap_ci_low=0.0)
    with pytest.raises(ValueError, match="margin"):
        head_role(_row(), margin=0.0)
    assert TOL < 1e-3


@pytest.fixture(scope="module")
def organism_task():
    return load_task("organism")


def _effects(name, task, n_validate=24):
    lm = load_model(name)
    draws = stage_draws(task, {"screen": 4, "confirm": 4, "validate": n_validate}, 11, seed=0)
    b = held_out_batches(task, lm.tokenizer, draws, n_ctx=lm.n_ctx, prepend_bos=lm.prepend_bos)
    abl = HeadAblation(lm.model, *b.stages["validate"], 4, mode="resample")
    sets = [[(l, h)] for l in range(2) for h in range(4)]
    eff = label_specific_effects(abl, ReadoutStepper(lm.model, b.zero_shot), sets, n_boot=300)
    return assign_roles(eff, mean_ci(abl.gap, n_boot=300)[1]).set_index("heads")


@pytest.mark.parametrize("name", ["constructed", "constructed-strong-prior", "constructed-two-readers"])
def test_the_planted_roles_are_recovered_at_the_readout_slots(name, organism_task):
    """Ground truth from the recipe (``models.constructed.planted``), not from the rules: the reader(s) are label
    heads, the query/class head L0H1 is a class head, the prior carrier a prior head, the decoy and the zero heads
    generic. L0H0 (previous-token class head) and the label mover L0H3 act at other positions than the readout slot,
    so at the slots they are generic."""
    p, roles = planted(name), _effects(name, organism_task).role
    assert all(roles[h] == "label" for h in p.label_heads)
    assert roles["L0H1"] == "class" and all(roles[h] == "prior" for h in p.prior_carriers)
    rest = {head_name(l, h) for l in range(2) for h in range(4)} - set(p.label_heads) - {"L0H1", *p.prior_carriers}
    assert all(roles[h] == "generic" for h in rest), roles.to_dict()


def test_with_mode_equals_a_fresh_ablation(tiny):
    task = helpers.toy_task(3)
    ids = sample_contexts(task, 6, 6, seed=0)
    kw = dict(n_ctx=tiny.n_ctx, prepend_bos=tiny.prepend_bos)
    pair = [build_prompt_batch(task, tiny.tokenizer, ids, c, **kw) for c in ("default", "flipped")]
    base = HeadAblation(tiny.model, *pair, k_min=3, mode="zero", n_resample=2, seed=4)
    sets = [[(1, 2)], [(0, 1), (1, 0)]]
    for mode in ("resample", "interchange", "mean_condition"):
        got, want = (
            base.with_mode(mode).scores(sets),
            HeadAblation(tiny.model, *pair, k_min=3, mode=mode, n_resample=2, seed=4).scores(sets),
        )
        np.testing.assert_array_equal(got.closed, want.closed)
    assert base.mode == "zero"  # the original is untouched


def test_control_norms_after_the_post_attention_norm_equal_a_reference():
    """Gemma-3 layout: ``|z_h W_O[h] * (1 + w) / sqrt(mean(attn_in^2) + eps)|`` with ``attn_in`` the post-attention
    norm's input from a plain forward and ``w``, ``eps`` from the Hugging Face module: the ablation's ``head_norms``."""
    lm = helpers.tiny_hf("gemma3")
    task = helpers.toy_task(3)
    ids = sample_contexts(task, 4, 6, seed=1)
    kw = dict(n_ctx=lm.n_ctx, prepend_bos=lm.prepend_bos)
    pair = [build_prompt_batch(task, lm.tokenizer, ids, c, **kw) for c in ("default", "flipped")]
    abl = HeadAblation(lm.model, *pair, k_min=3, mode="zero")
    got = abl.head_norms(lm.model)
    hf_layers = lm.model.original_model.model.layers
    ref = np.zeros_like(got)
    for b in pair:
        store = {}
        names = [f"blocks.{l}.{n}" for l in range(2) for n in ("attn.hook_z", "ln1_post.hook_in")]
        hooks = [(n, lambda x, hook, n=n: store.__setitem__(n, x.detach().clone())) for n in names]
        with torch.no_grad():
            run_to_final(lm.model, b.tokens, hooks)
        rows, pos = torch.arange(b.n_contexts)[:, None], b.readout_pos[:, 3:]
        for l in range(2):
            norm = hf_layers[l].post_attention_layernorm
            x = store[f"blocks.{l}.ln1_post.hook_in"][rows, pos].double()
            scale = (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()  # [b, S, 1]
            W = lm.model.original_model.model.layers[l].self_attn.o_proj.weight.double()  # [d_model, H*d]
            z = store[f"blocks.{l}.attn.hook_z"][rows, pos].double()  # [b, S, H, d]
            for h in range(4):
                out = z[:, :, h] @ W[:, h * 16 : (h + 1) * 16].T / scale * (1 + norm.weight.double())
                ref[l, h] += out.norm(dim=-1).mean().item() / 2
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    assert (
        abl.st["correct"].post_scale is not None
        and HeadAblation(load_model("organism-strong").model, *_organism_pair(), k_min=3).st["correct"].post_scale
        is None
    )  # a model without the norm keeps the plain ``z W_O`` norm


def _organism_pair():
    lm, task = load_model("organism-strong"), load_task("organism")
    ids = sample_contexts(task, 4, 6, seed=0)
    kw = dict(n_ctx=lm.n_ctx, prepend_bos=lm.prepend_bos)
    return [build_prompt_batch(task, lm.tokenizer, ids, c, **kw) for c in ("default", "flipped")]
