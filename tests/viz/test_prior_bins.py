"""The competition figure's prior bins run left to right from the weakest prior for the true class."""

from __future__ import annotations

from mechicl.viz.prior import _bin_low


def test_bins_sort_by_their_lower_edge():
    shown = ["[+0, +1)", "[+2, inf)", "[+1, +2)", "[-1, +0)", "[-inf, -1)", "all"]
    assert sorted(shown, key=_bin_low) == ["[-inf, -1)", "all", "[-1, +0)", "[+0, +1)", "[+1, +2)", "[+2, inf)"]
