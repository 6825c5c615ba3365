"""The value a patching sweep returns (``PatchResult``), its tidy rows (``cell_table``) and the 0 = corrupted,
1 = clean normalisation (``normalise``), shared by exact (``analysis.patching.exact``), attribution and label-position
patching. Re-exported by ``analysis.patching.exact``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechicl.errors import PairError


def cell_table(kind: str, direction: str, axes: tuple[str, str], **columns: Float[Tensor, "n0 n1"]) -> pd.DataFrame:
    """Tidy rows of a sweep's ``[n0, n1]`` grids: kind, direction, the two axis indices, then each column."""
    n0, n1 = next(iter(columns.values())).shape
    return pd.DataFrame(
        {
            "kind": kind,
            "direction": direction,
            axes[0]: np.repeat(np.arange(n0), n1),
            axes[1]: np.tile(np.arange(n1), n0),
            **{name: v.reshape(-1).numpy() for name, v in columns.items()},
        }
    )


@dataclass(frozen=True)
class PatchResult:
    """A patching sweep: normalised effects on labelled axes plus per-context logit differences.

    ``values[layer, idx]`` is the normalised metric of the patched run (0 = corrupted,
    1 = clean); ``logit_diff[layer, idx, batch]`` the raw per-context LD.
    ``forwards`` counts receiver-forward equivalents spent (cached runs included; a re-run of part of the
    blocks or positions counts that fraction: ``(L - l) / L x (width - s) / width`` per cell).
    """

    kind: str
    direction: str
    axes: tuple[str, str]
    values: Float[Tensor, "layer idx"]
    logit_diff: Float[Tensor, "layer idx batch"]
    clean_ld: Float[Tensor, "batch"]
    corrupted_ld: Float[Tensor, "batch"]
    forwards: float = 0.0
    seconds: float = 0.0
    computed: Bool[Tensor, "layer idx"] | None = None  # cells actually run (others are no-ops / not requested)
    pos_roles: tuple[str, ...] = ()  # role of each position (for pos axes), "mixed" where contexts differ
    description: str = ""
    items: Int[Tensor, "batch example"] | None = None  # each context's task rows: widens the intervals

    @property
    def effect(self) -> Float[Tensor, "layer idx"]:
        """Change caused by the patch on the normalised scale (signed: + towards the clean run)."""
        return self.values - (0.0 if self.direction == "denoise" else 1.0)

    def table(self) -> pd.DataFrame:
        """One row per cell: axes, normalised value, effect, mean LD, whether it was computed."""
        df = cell_table(
            self.kind,
            self.direction,
            self.axes,
            value=self.values,
            effect=self.effect,
            mean_logit_diff=self.logit_diff.mean(-1),
        )
        if self.pos_roles:
            df["role"] = [self.pos_roles[p] for p in df[self.axes[1]]]
        if self.computed is not None:
            df["computed"] = self.computed.reshape(-1).numpy()
        return df


def normalise(ld: Tensor, clean_ld: Tensor, corrupted_ld: Tensor) -> Tensor:
    """Batch-mean LD on the 0 = corrupted, 1 = clean scale (last axis is the batch)."""
    c, k = clean_ld.mean(), corrupted_ld.mean()
    if abs(float(c - k)) < 1e-6:
        raise PairError(
            f"the clean and corrupted runs give the same mean logit difference ({float(c):.4g}); "
            f"there is no effect to recover. Use more in-context examples or another task."
        )
    return (ld.mean(-1) - k) / (c - k)
