"""The one p-value text: "p <= floor" at the Monte-Carlo floor 1 / (1 + n)."""

from __future__ import annotations

import numpy as np

from mechicl.analysis.stats import fmt_p, p_text, sign_flip_p


def test_p_at_its_floor_is_a_bound():
    p = float(sign_flip_p(np.full(20, 1.0), n_perm=999))  # every flip but the identity is smaller
    assert p == 1 / 1000
    assert p_text(p, 999) == "p <= 0.001"
    assert p_text(1 / 144, 143) == "p <= 0.0069"  # the floor to 2 significant digits


def test_p_above_its_floor_and_not_finite():
    assert p_text(0.25, 999) == "p = 0.25" and p_text(0.123456, 999) == "p = 0.123"
    assert p_text(2 / 1000, 999) == "p = 0.002"
    assert p_text(float("nan"), 999) == "p n/a"


def test_bare_form_for_a_table_column():
    assert p_text(1 / 1000, 999, label="") == "<= 0.001" and p_text(0.25, 999, label="") == "0.25"
    assert p_text(float("inf"), 10, label="") == "n/a"
    for p in (1 / 4001, 0.03, np.nan):
        assert fmt_p(p, 4000) == p_text(p, 4000, label="")
