"""Dose-response: the scaled re-runs against hooked full forwards, the flip point on known curves, and the Bayes
reader's evidence scale against its own posterior."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from mechicl.analysis.engine.slots import SlotStepper
from mechicl.analysis.prior.dose import dose_response, dose_table, flip_point
from mechicl.data.optimal_reader import bayes_point, evidence_flip_scale, posterior
from mechicl.data.organism import LanguageConfig
from tests import helpers
from tests.analysis.engine.test_slots import _reference

HEADS = [(1, 2), (0, 1)]


@pytest.fixture(scope="module")
def setup():
    loaded = helpers.tiny_hf("llama")
    kw = dict(n_contexts=3, n_examples=5, seed=1)
    c, f = (helpers.batch(loaded, helpers.toy_task(2), x, **kw) for x in ("default", "flipped"))
    return loaded, f, SlotStepper(loaded.model, c, 2), SlotStepper(loaded.model, f, 2)


@pytest.mark.parametrize("kind", ["label", "output"])
def test_doses_equal_hooked_forwards(setup, kind):
    loaded, f, sc, sf = setup
    res = dose_response(sc, sf, HEADS, scales=(0.0, 1.0, 2.5), kind=kind)
    true, foil = sc.true_labels, f.shown_labels[:, 2:]
    rows, cols = torch.arange(3)[:, None], torch.arange(3)[None]
    for i, a in enumerate((0.0, 1.0, 2.5)):
        m = sf.z.mean(0, keepdim=True)
        src = sc.z + a * (sf.z - sc.z) if kind == "label" else m + a * (sf.z - m)
        ref = _reference(loaded, f, 2, HEADS, src).double()  # [b, S, labels]
        ld = ref[rows, cols, true] - ref[rows, cols, foil]
        np.testing.assert_allclose(res.ld[i], ld.numpy(), atol=1e-4)
        np.testing.assert_array_equal(res.sides_with_labels[i], (ref.argmax(-1) == foil).double().numpy())
    base = sf.base_logits.double()
    np.testing.assert_allclose(res.ld[1], (base[rows, cols, true] - base[rows, cols, foil]).numpy(), atol=1e-4)
    np.testing.assert_allclose(res.predicted_ld[[0, 1]], res.ld[[0, 1]], atol=1e-12)  # fitted on doses 0 and 1
    assert not np.allclose(res.ld[2], res.ld[1])  # the dose moves something: the comparison can fail
    with pytest.raises(ValueError, match="include 0 and 1"):
        dose_response(sc, sf, HEADS, scales=(0.5, 2.0))


def test_flip_point_interpolates_the_first_crossing():
    a = np.array([0.0, 1.0, 2.0, 3.0])
    assert flip_point(a, np.array([0.2, 0.4, 0.6, 0.8])) == pytest.approx(1.5)
    assert flip_point(a, np.array([0.9, 0.7, 0.3, 0.1])) == pytest.approx(1.5)
    assert flip_point(a, np.array([0.1, 0.5, 0.9, 0.9])) == pytest.approx(1.0)
    assert np.isnan(flip_point(a, np.array([0.1, 0.2, 0.3, 0.4])))
    assert flip_point(a, np.array([0.2, 0.6, 0.4, 0.8])) == pytest.approx(0.75)  # the first of several


def test_dose_table_rows_and_flip_points(setup):
    _, _, sc, sf = setup
    res = dose_response(sc, sf, HEADS, scales=(0.0, 1.0, 3.0))
    tab = dose_table(res, [(2, 4)], n_boot=200)
    assert list(tab.scale) == [0.0, 1.0, 3.0] and set(tab.heads) == {"L1H2 L0H1"}
    assert tab.sides_with_labels.tolist() == pytest.approx(res.sides_with_labels.mean((1, 2)).tolist())
    assert tab.flip_measured.nunique(dropna=False) == 1  # one flip point per k group
    want = flip_point(res.scales, res.sides_with_labels.mean(-1).mean(-1))
    assert tab.flip_measured.iloc[0] == pytest.approx(want, nan_ok=True)


def test_bayes_evidence_scale_is_where_the_posterior_ties():
    cfg = LanguageConfig.from_prior_strength(0.9, label_noise=0.1)
    for k in (1, 2, 4):
        a = evidence_flip_scale(cfg, k)
        eps = 1 / (1 + 9**a)  # log((1 - eps) / eps) = a log 9: the evidence scaled by a
        post = posterior(dataclasses.replace(cfg, label_noise=eps), np.ones((1, k), int), np.zeros((1, k), int))
        assert post[0, 0] == pytest.approx(post[0, 1], rel=1e-9)  # default and flipped maps tie
        _, acc = bayes_point(cfg, "flipped", k)  # the real reader (a = 1) follows the labels iff a < 1
        assert acc == (1.0 if a < 1 else 0.0 if a > 1 else 0.5)
    assert evidence_flip_scale(cfg, 1) == pytest.approx(math.log(9) / math.log(9))
    with pytest.raises(ValueError, match="k >= 1"):
        evidence_flip_scale(cfg, 0)
