"""Tidy per-head tables: the long (layer, head, value) frames every head-level analysis returns."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mechicl.data.names import head_name


def heads_frame(values: np.ndarray, **cols: Any) -> pd.DataFrame:
    """Long frame from ``values[layer, head, ...]`` with layer/head columns."""
    n_layers, n_heads = values.shape[:2]
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    return pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(), **cols})


def top_heads(df: pd.DataFrame, score: str, n: int = 10, ascending: bool = False) -> pd.DataFrame:
    """The ``n`` heads with the largest (or smallest) ``score``, named ``L{layer}H{head}``."""
    out = df.sort_values(score, ascending=ascending).head(n).copy()
    out.insert(0, "name", [head_name(l, h) for l, h in zip(out.layer, out["head"])])
    return out.reset_index(drop=True)
