"""The one way a Monte-Carlo p-value is written.

A p-value ``(1 + hits) / (1 + n_draws)`` cannot go below its floor ``1 / (1 + n_draws)``; at the floor it
only bounds the true p, so it is written "p <= floor" (the floor to 2 significant digits), elsewhere
"p = 0.123" (3 significant digits); a non-finite p is "p n/a". Cost: none.
"""

from __future__ import annotations

import numpy as np


def p_text(p: float, n_draws: int, *, label: str = "p") -> str:
    """``p`` as text; ``label=""`` gives the bare forms for a table column headed p ("<= 0.00025", "0.25", "n/a")."""
    lead = f"{label} " if label else ""
    if not np.isfinite(p):
        return f"{lead}n/a"
    floor = 1 / (n_draws + 1)
    if p <= floor * (1 + 1e-9):
        return f"{lead}<= {floor:.2g}"
    return f"{lead}= {p:.3g}" if label else f"{p:.3g}"


def fmt_p(p: float, n_perm: int) -> str:
    """``p_text`` in a table cell headed p: ``p_text(p, n_perm, label="")``."""
    return p_text(p, n_perm, label="")
