"""Markdown for run folders' summaries: tables whose cells may hold user text (task rows, label words, tokens)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")


def md_cell(value: Any) -> str:
    """One markdown table cell from text that may come from a user (task rows, label words, token strings): a
    ``|`` cannot end the cell, a newline cannot end the row, and a ``<`` that would open an HTML tag (``<script``,
    ``</``, ``<!--``) is written ``&lt;``, so a viewer that renders inline HTML shows it as text. Comparisons such as
    ``p <= 0.01`` are left as they are."""
    text = str(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    return _TAG_START.sub("&lt;", text)


def md_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A markdown table (floats rounded to ``digits``; other cells escaped by ``md_cell``)."""
    cols = [md_cell(c) for c in df.columns]
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else md_cell(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
