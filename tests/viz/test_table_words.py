"""Report tables in words (``viz.table_words``): headers with units, CIs merged into one cell, yes / no, "≤" at a
Monte-Carlo floor, and an error for a raw column nobody named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mechicl.analysis.stats import fmt_p
from mechicl.viz.report_html import table_html
from mechicl.viz.table_words import COLUMNS, NBSP, ci_text, words


def test_ci_text_reads_like_the_issue():
    assert ci_text(0.84, 0.14, 1.354) == "0.84 [0.14, 1.35]"
    assert ci_text(0.84, 0.14, 1.354, signed=True) == "+0.84 [+0.14, +1.35]"
    assert ci_text(-0.0371, -0.0883, 0.0012, 3, signed=True) == "-0.037 [-0.088, +0.001]"


def test_suffixed_and_bare_cis_merge_into_their_estimate():
    df = pd.DataFrame(
        {
            "heads": ["L11H2"],
            "effect": [0.84],
            "effect_ci_low": [0.14],
            "effect_ci_high": [1.35],
            "p": [fmt_p(1 / 4001, 4000)],
            "above_control": [True],
            "mean_diff": [0.1234],
            "ci_low": [-0.01],
            "ci_high": [0.2],
            "already in words": [np.nan],
        }
    )
    w = words(df)
    assert list(w.columns) == [
        COLUMNS["heads"].header,
        COLUMNS["effect"].header + " [95% CI]",
        COLUMNS["p"].header,
        COLUMNS["above_control"].header,
        COLUMNS["mean_diff"].header + " [95% CI]",
        "already in words",
    ]
    row = [t.replace(NBSP, " ") for t in w.iloc[0]]
    assert row == ["L11H2", "+0.84 [+0.14, +1.35]", "≤ 0.00025", "yes", "+0.123 [-0.010, +0.200]", "n/a"]
    assert NBSP in w.iloc[0, 1] and NBSP in w.iloc[0, 2]  # a CI cell or bound does not break across lines


def test_units_and_digits_come_from_the_column():
    w = words(pd.DataFrame({"stage": ["patching"], "seconds": [12.345], "forwards": [np.int64(7)]}), digits=3)
    assert list(w.columns) == ["stage", "wall time (s)", "forwards"] and list(w.iloc[0]) == ["patching", "12.3", "7"]


def test_a_raw_column_without_words_is_an_error():
    with pytest.raises(ValueError, match="'some_field' has no header in words"):
        words(pd.DataFrame({"some_field": [1.0]}))
    with pytest.raises(ValueError, match="needs its estimate"):
        words(pd.DataFrame({"ci_low": [0.0], "ci_high": [1.0]}))


def test_every_header_is_words():
    """No header in the mapping is itself a field name (lower-case with an underscore)."""
    assert not [c.header for c in COLUMNS.values() if "_" in c.header]


def test_table_html_renders_the_words():
    html = table_html(pd.DataFrame({"diff": [0.5], "diff_ci_low": [0.25], "diff_ci_high": [0.75]}))
    assert "head − controls (share of the gap) [95% CI]" in html and f"+0.50{NBSP}[+0.25,{NBSP}+0.75]" in html
    assert "diff_ci_low" not in html
