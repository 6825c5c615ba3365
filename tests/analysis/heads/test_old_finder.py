"""The head finder's verdict: found != ranked first; p-values at the Monte-Carlo floor are written "<="."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mechicl.analysis.heads.old_finder import p_text, verdict


def _heads(rows: list[tuple]) -> pd.DataFrame:
    """Candidates as ``find_heads`` ranks them (by patch_denoise): (layer, head, gap_mean, ci_low, ci_high, control_p)."""
    return pd.DataFrame(
        [
            {
                "rank": i + 1,
                "layer": l,
                "head": h,
                "patch_denoise": 1.0 - 0.1 * i,
                "gap_reduction_mean": g,
                "gap_reduction_zero": g,
                "gap_reduction_ci_low": lo,
                "gap_reduction_ci_high": hi,
                "control_p": p,
                "n_other": 7,
            }
            for i, (l, h, g, lo, hi, p) in enumerate(rows)
        ]
    )


def test_the_found_head_need_not_be_ranked_first():
    v = verdict(_heads([(0, 2, 0.10, -0.05, 0.25, 0.5), (1, 1, 0.60, 0.40, 0.80, 1 / 8)]))
    assert v.found == ((1, 1),)
    assert v.line.startswith("Verdict: L1H1 is the only head") and "p <= 0.125 against 7 other heads" in v.line
    assert "excludes 0" in v.rule and "every other head" in v.rule


def test_no_head_passes_when_the_ci_touches_zero_or_another_head_is_larger():
    ci_touches = verdict(_heads([(1, 1, 0.60, -0.01, 0.80, 1 / 8), (0, 2, 0.10, 0.05, 0.2, 0.5)]))
    assert ci_touches.found == () and "no head passes" in ci_touches.line and "L1H1" in ci_touches.line
    beaten = verdict(_heads([(1, 1, 0.60, 0.40, 0.80, 2 / 8)]))
    assert beaten.found == () and "p = 0.25" in beaten.line
    assert verdict(_heads([])).found == ()


def test_p_text_marks_the_floor():
    assert p_text(1 / 32, 31) == "p <= 0.0312" and p_text(2 / 32, 31) == "p = 0.0625" and p_text(np.nan, 3) == "p n/a"
