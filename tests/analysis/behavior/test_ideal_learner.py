"""The ideal learner with the model's own prior: fit against brute force, predictions in closed form."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import expit, log_expit

from mechicl.analysis.behavior.curves import score
from mechicl.analysis.behavior.ideal_learner import (
    LearnerInputs,
    evidence_sums,
    fit_beta,
    fit_weight_and_beta,
    learner_curves,
    learner_inputs,
    learner_scores,
    zero_shot_log_odds,
)
from mechicl.analysis.engine.readout import label_logits
from mechicl.data.prompts import build_prompt_batch, sample_contexts


def _synthetic(
    beta: float | dict[int, float], n: int = 200, e: int = 9, seed: int = 0, hard: bool = False, w: float = 1.0
):
    """Contexts whose 'model' is exactly a Bayes learner with known beta: default and flipped conditions."""
    rng = np.random.default_rng(seed)
    z = rng.normal(1.5, 1.0, (n, e))
    cls = rng.integers(0, 2, (n, e))
    b = np.vectorize(beta.get)(cls) if isinstance(beta, dict) else np.full((n, e), beta)
    signs = {"default": np.ones((n, e)), "flipped": -np.ones((n, e))}
    ll = {}
    for cond, s in signs.items():
        eta = (w * z + b * evidence_sums(s)) * s
        if hard:  # the 'model' answers with sampled labels: a noisy log-likelihood target
            ll[cond] = np.where(rng.random((n, e)) < expit(eta), np.log(1 - 1e-9), np.log(1e-9))
        else:
            ll[cond] = log_expit(eta)
    return LearnerInputs(z, cls, signs, ll)


def test_evidence_sums_count_only_earlier_demonstrations():
    s = np.array([[1, -1, -1, 1], [-1, -1, -1, -1]], dtype=float)
    assert evidence_sums(s).tolist() == [[0, 1, 0, -1], [0, -1, -2, -3]]


def test_fit_recovers_the_generating_evidence_strength():
    x = _synthetic(0.37)
    z, s, p = x.z[:, 1:], evidence_sums(x.signs["default"])[:, 1:], np.exp(x.model_ll["default"][:, 1:])
    assert fit_beta(z, s, p) == pytest.approx(0.37, abs=1e-5)


def test_fit_with_sampled_answers_equals_brute_force_maximum():
    x = _synthetic(0.25, n=400, hard=True, seed=3)
    z, s, p = (
        x.z[:, 1:].ravel(),
        evidence_sums(x.signs["default"])[:, 1:].ravel(),
        np.exp(x.model_ll["default"][:, 1:]).ravel(),
    )
    grid = np.linspace(0, 2, 20001)  # brute force: evaluate the log-likelihood on a fine grid
    ll = [np.sum(p * log_expit(z + g * s) + (1 - p) * log_expit(-(z + g * s))) for g in grid]
    fitted = fit_beta(z, s, p)
    assert fitted == pytest.approx(grid[int(np.argmax(ll))], abs=2e-4)
    assert (
        abs(np.sum((p - expit(z + fitted * s)) * s)) < 1e-2 * len(z) ** 0.5
    )  # the score equation holds at the maximum
    assert 0.15 < fitted < 0.35  # and the sampled answers still point to the generating beta


def test_fit_stops_at_zero_when_confidence_falls_with_agreeing_demonstrations():
    x = _synthetic(0.0)
    z = x.z[:, 1:]
    s = evidence_sums(x.signs["default"])[:, 1:]
    assert fit_beta(z, s, expit(z - 0.1 * s)) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="not identified"):
        fit_beta(z[:, :1] * 0, np.zeros((len(z), 1)), expit(z[:, :1]))


def test_prior_weight_and_beta_recovered_and_equal_to_a_brute_force_grid():
    x = _synthetic(0.3, w=0.6, n=300)
    z, s, p = x.z[:, 1:], evidence_sums(x.signs["default"])[:, 1:], np.exp(x.model_ll["default"][:, 1:])
    w, beta = fit_weight_and_beta(z, s, p)
    assert (w, beta) == pytest.approx((0.6, 0.3), abs=1e-4)
    hard = _synthetic(0.2, w=0.7, n=300, hard=True, seed=5)
    z, s, p = (
        a.ravel()
        for a in (hard.z[:, 1:], evidence_sums(hard.signs["default"])[:, 1:], np.exp(hard.model_ll["default"][:, 1:]))
    )
    ws, bs = np.meshgrid(np.linspace(0.3, 1.1, 321), np.linspace(0.0, 0.5, 201), indexing="ij")
    eta = ws[..., None] * z + bs[..., None] * s  # brute force: the log-likelihood on a grid
    ll = (p * log_expit(eta) + (1 - p) * log_expit(-eta)).sum(-1)
    i, j = np.unravel_index(np.argmax(ll), ll.shape)
    assert fit_weight_and_beta(z, s, p) == pytest.approx((ws[i, j], bs[i, j]), abs=3e-3)
    res = learner_curves(_synthetic(0.3, w=0.6, n=100), n_boot=20, rescaled=True)
    assert res.fit.prior_weight.iloc[0] == pytest.approx(0.6, abs=1e-4) and res.rescaled
    d = res.curves[res.curves.source == "model - bayes"]
    assert np.abs(d["mean"]).max() < 1e-5  # the rescaled learner reproduces a rescaled Bayes model exactly


def test_flipped_prediction_in_closed_form():
    x = _synthetic(0.3, n=5, e=4)
    ll, acc = learner_scores(x, {-1: (1.0, 0.3)}, "flipped")
    k = np.arange(4)
    assert np.allclose(ll, np.log(1 - expit(x.z - 0.3 * k)))  # sigma(-(z - beta k)): the flipped label's probability
    assert np.array_equal(acc, (x.z - 0.3 * k < 0).astype(float))


def test_curves_of_a_bayes_model_match_the_learner_and_per_class_fits_differ():
    x = _synthetic({0: 0.1, 1: 0.6}, n=150)
    res = learner_curves(x, per_class=True, n_boot=50)
    assert dict(zip(res.fit.query_class, res.fit.beta.round(4))) == {0: 0.1, 1: 0.6}
    diff = res.curves[(res.curves.source == "model - bayes") & (res.curves.metric == "log_likelihood")]
    assert np.abs(diff["mean"]).max() < 1e-6 and set(diff.condition) == {"default", "flipped"}
    one = learner_curves(x, per_class=False, n_boot=50)  # a single beta cannot fit both classes exactly
    d1 = one.curves[(one.curves.source == "model - bayes") & (one.curves.metric == "log_likelihood")]
    assert np.abs(d1["mean"]).max() > 1e-3
    row = one.fit.iloc[0]
    assert row.ci_low <= row.beta <= row.ci_high and row.query_class == "all"


def test_bootstrap_interval_covers_the_point_estimate_and_shrinks_with_contexts():
    small = learner_curves(_synthetic(0.3, n=40, hard=True, seed=1), n_boot=200).curves
    big = learner_curves(_synthetic(0.3, n=400, hard=True, seed=1), n_boot=200).curves
    pick = lambda c: c[
        (c.condition == "flipped") & (c.source == "bayes") & (c.metric == "log_likelihood") & (c.k == 8)
    ].iloc[0]
    s, b = pick(small), pick(big)
    assert s.ci_low <= s["mean"] <= s.ci_high
    assert (b.ci_high - b.ci_low) < 0.6 * (s.ci_high - s.ci_low)


def test_inputs_check_the_default_condition():
    x = _synthetic(0.3, n=4, e=3)
    with pytest.raises(ValueError, match="must show every true label"):
        LearnerInputs(x.z, x.true_class, {"default": -np.ones((4, 3))}, {"default": x.model_ll["default"]})
    with pytest.raises(ValueError, match="not among"):
        LearnerInputs(x.z, x.true_class, {"flipped": x.signs["flipped"]}, {"flipped": x.model_ll["flipped"]})


def test_zero_shot_log_odds_equal_the_first_slot_of_a_context(tiny, toy):
    """The k = 0 readout of a context sees only its first example: the same prompt as that example alone."""
    ids = sample_contexts(toy, 4, 5, seed=2)
    kw = dict(n_ctx=tiny.n_ctx, prepend_bos=tiny.prepend_bos)
    full = build_prompt_batch(toy, tiny.tokenizer, ids, "default", **kw)
    single = build_prompt_batch(toy, tiny.tokenizer, ids[:, :1], "default", **kw)
    z = zero_shot_log_odds(tiny.model, single, progress=False)
    lp = torch.log_softmax(label_logits(tiny.model, full, progress=False)[:, 0].double(), -1)
    t = full.true_labels[:, 0]
    ref = (lp[torch.arange(4), t] - lp[torch.arange(4), 1 - t]).numpy()
    assert np.allclose(z, ref, atol=1e-5)


def test_inputs_from_behaviour_scores(tiny, toy):
    ids = sample_contexts(toy, 3, 4, seed=1)
    kw = dict(n_ctx=tiny.n_ctx, prepend_bos=tiny.prepend_bos)
    batches = [build_prompt_batch(toy, tiny.tokenizer, ids, c, **kw) for c in ("default", "flipped")]
    raw = pd.concat([score(label_logits(tiny.model, b, progress=False), b) for b in batches])
    items = torch.unique(ids)
    x = learner_inputs(raw, batches, items, items.double().numpy())  # z = the row id, to check the lookup
    assert np.array_equal(x.z, ids.double().numpy())
    assert (x.signs["flipped"] == -1).all() and (x.signs["default"] == 1).all()
    want = raw[(raw.condition == "flipped") & (raw.metric == "log_likelihood") & (raw.context == 2)].sort_values("k")
    assert np.allclose(x.model_ll["flipped"][2], want.value)
    other = build_prompt_batch(toy, tiny.tokenizer, sample_contexts(toy, 3, 4, seed=9), "flipped", **kw)
    with pytest.raises(ValueError, match="same context draws"):
        learner_inputs(raw, [batches[0], other], items, items.double().numpy())
