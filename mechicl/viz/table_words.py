"""Report tables in words: the one place a report table's raw columns become what a reader sees.

Each raw column has a header in words with its unit (``COLUMNS``). An estimate with a 95% CI is one cell,
"0.84 [0.14, 1.35]", signed ("+0.84 [+0.14, +1.35]") where the quantity is an effect or a difference; the CI
columns are ``X_ci_low`` / ``X_ci_high`` of the estimate ``X``, or bare ``ci_low`` / ``ci_high`` right after
the estimate they belong to. Booleans read yes / no, a missing number n/a, and a Monte-Carlo p-value at its
floor (written "<= 0.0045" by ``analysis.stats.text.p_text``) "≤ 0.0045", on one line. A cell "0.84 [0.14, 1.35]" (merged
here or written so by its section) keeps its spaces unbreakable, so a narrow column does not split it. A column
already written in words (anything but a lower-case identifier) is kept as it is; a raw column missing from
``COLUMNS`` is an error, so a new table cannot show a reader a field name. Cost: none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

CI = " [95% CI]"
RAW = re.compile(r"[a-z][a-z0-9_]*")  # a field name, not words
CI_CELL = re.compile(r"[+-]?[\d.]+ \[[+-]?[\d.]+, [+-]?[\d.]+\]")  # "0.84 [0.14, 1.35]": kept on one line
NBSP = "\u00a0"


@dataclass(frozen=True)
class Col:
    """A column's header in words (with its unit) and how its numbers are written."""

    header: str
    signed: bool = False  # an effect or a difference: "+0.84"
    digits: int | None = None  # None: the table's digits


GAP = "share of the gap"
COLUMNS: dict[str, Col] = {
    # names of things
    "head": Col("head"),
    "heads": Col("head(s)"),
    "name": Col("head"),
    "role": Col("role"),
    "test": Col("test"),
    "verdict": Col("verdict"),
    "controls": Col("matched control heads"),
    "rank": Col("rank (confirm)"),
    "stage": Col("stage"),
    "fact": Col("fact"),
    "value": Col("value"),
    "contexts": Col("contexts"),
    # behaviour: the NH tests
    "k": Col("k (demonstrations)"),
    "a": Col("a (condition: score)"),
    "b": Col("b (condition: score)"),
    "mean_diff": Col("a − b (mean paired difference)", signed=True, digits=3),
    "decision": Col("decision"),
    # attention vs attention attribution on label tokens at the readout slot
    "attention_flipped": Col("attention on labels, flipped (share)"),
    "attention_correct": Col("attention on labels, correct (share)"),
    "attribution_flipped": Col("AttAttr on labels, flipped (logit diff.)", signed=True, digits=3),
    "attribution_correct": Col("AttAttr on labels, correct (logit diff.)", signed=True, digits=3),
    "attribution_share_flipped": Col("AttAttr on labels, flipped (share of the head's total)", signed=True),
    # the head finder: ablation against matched controls (shares of the correct-vs-flipped gap in P(true))
    "effect": Col(f"gap closed by ablation ({GAP})", signed=True),
    "control_mean": Col(f"controls' mean ({GAP})", signed=True),
    "diff": Col(f"head − controls ({GAP})", signed=True),
    "p": Col("p (vs controls)"),
    "above_control": Col("above controls"),
    "d_p_zero_shot": Col("zero-shot ΔP(true) when ablated", signed=True, digits=3),
    # the findings grid and path patching
    "per_task": Col("per task"),
    "effect_median": Col(f"effect, median ({GAP})", signed=True),
    "effect_min": Col(f"effect, min ({GAP})", signed=True),
    "effect_max": Col(f"effect, max ({GAP})", signed=True),
    "control_mean_median": Col(f"controls, median ({GAP})", signed=True),
    "sender": Col("sender"),
    "receiver": Col("receiver"),
    "input": Col("receiver input"),
    "positions": Col("sender positions"),
    "mlps": Col("MLPs"),
    "path_effect": Col("path effect (share of the full effect)", signed=True),
    # run facts
    "seconds": Col("wall time (s)", digits=1),
    "forwards": Col("forwards"),
    "rows": Col("context rows"),
    "peak_rss_gb": Col("peak RSS so far (GB)", digits=2),
}


def column(name: str) -> Col:
    """``name``'s header and format: a column already in words is kept; a raw name must be in ``COLUMNS``."""
    if name in COLUMNS:
        return COLUMNS[name]
    if RAW.fullmatch(name):
        raise ValueError(f"report table column {name!r} has no header in words: add it to viz.table_words.COLUMNS")
    return Col(name)


def number(v: Any, digits: int, signed: bool = False) -> str:
    """One cell: a float to ``digits`` decimals (with its sign where ``signed``), yes / no, n/a, "≤" at a floor."""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{v:+d}" if signed else str(v)
    if isinstance(v, (float, np.floating)):
        return "n/a" if not np.isfinite(v) else f"{v:{'+' if signed else ''}.{digits}f}"
    if v is None or v is pd.NA:
        return "n/a"
    return re.sub(r"^<= ", "≤" + NBSP, str(v))


def ci_text(m: float, lo: float, hi: float, digits: int = 2, signed: bool = False) -> str:
    """An estimate and its 95% CI as one cell: "0.84 [0.14, 1.35]" ("+0.84 [+0.14, +1.35]" where ``signed``)."""
    return f"{number(m, digits, signed)} [{number(lo, digits, signed)}, {number(hi, digits, signed)}]"


def _ci_columns(cols: list[str]) -> dict[str, tuple[str, str]]:
    """Estimate -> its (low, high) columns: ``X_ci_low``/``X_ci_high``, or bare ``ci_low``/``ci_high`` after ``X``."""
    out = {}
    for i, c in enumerate(cols):
        if c.endswith("_ci_low") and c.removesuffix("_ci_low") in cols:
            x = c.removesuffix("_ci_low")
            out[x] = (c, f"{x}_ci_high")
        elif c == "ci_low":
            if i == 0:
                raise ValueError("a bare ci_low column needs its estimate right before it")
            out[cols[i - 1]] = ("ci_low", "ci_high")
    return out


def words(df: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """``df`` as the reader sees it: every cell text, CIs merged into their estimate, headers in words."""
    cols = [str(c) for c in df.columns]
    cis = _ci_columns(cols)
    merged = {c for pair in cis.values() for c in pair}
    out = {}
    for c in cols:
        if c in merged:
            continue
        spec = column(c)
        d = digits if spec.digits is None else spec.digits
        if c in cis:
            lo, hi = cis[c]
            cells = [ci_text(m, a, b, d, spec.signed) for m, a, b in zip(df[c], df[lo], df[hi])]
            out[spec.header + CI] = cells
        else:
            out[spec.header] = [number(v, d, spec.signed) for v in df[c]]
    keep = lambda t: t.replace(" ", NBSP) if CI_CELL.fullmatch(t) else t  # noqa: E731
    return pd.DataFrame({h: [keep(t) for t in cells] for h, cells in out.items()}, index=range(len(df)))
