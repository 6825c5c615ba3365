"""The statistics core: every bootstrap, permutation test, interval, correction and p-value text in mechicl.

Callers write ``from mechicl.analysis.stats import mean_ci, sign_flip_p, ...``. One module per idea:

- ``bootstrap``: context and cluster bootstraps, the shared-row design effect (``bootstrap_indices``,
  ``bootstrap_counts``, ``cluster_counts``, ``shared_row_design_effect``, ``bootstrap_means``, ``mean_ci``, ``ratio_ci``) and the draw-count check;
- ``intervals``: Student-t, Wilson and percentile intervals;
- ``tests``: the sign-flip permutation test, the paired test, Holm;
- ``equivalence``: equivalence margins and TOST;
- ``decisions``: reject / no effect / not enough draws, over k;
- ``text``: the one p-value text.

No other module in ``analysis/``, ``runs/`` or ``viz/`` draws resamples (``tests/test_architecture.py``).
"""

from mechicl.analysis.stats.bootstrap import (
    MIN_DRAWS,
    bootstrap_counts,
    bootstrap_indices,
    bootstrap_means,
    check_draws,
    cluster_counts,
    mean_ci,
    ratio_ci,
    shared_row_design_effect,
    widen_for_shared_rows,
)
from mechicl.analysis.stats.decisions import NOT_ENOUGH, compare_over_k, decide
from mechicl.analysis.stats.equivalence import Margin, check_margin, relative_margin, tost
from mechicl.analysis.stats.intervals import percentile_interval, t_half_width, t_interval, wilson_interval
from mechicl.analysis.stats.tests import ALTERNATIVES, PairedResult, holm, paired_test, sign_flip_p
from mechicl.analysis.stats.text import fmt_p, p_text

__all__ = [
    "ALTERNATIVES",
    "MIN_DRAWS",
    "NOT_ENOUGH",
    "Margin",
    "PairedResult",
    "bootstrap_counts",
    "bootstrap_indices",
    "bootstrap_means",
    "check_draws",
    "check_margin",
    "cluster_counts",
    "compare_over_k",
    "decide",
    "fmt_p",
    "holm",
    "mean_ci",
    "p_text",
    "paired_test",
    "percentile_interval",
    "ratio_ci",
    "relative_margin",
    "shared_row_design_effect",
    "sign_flip_p",
    "t_half_width",
    "t_interval",
    "tost",
    "widen_for_shared_rows",
    "wilson_interval",
]
