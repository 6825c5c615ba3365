"""Ground-truth label-reading heads of an organism, defined without the head finder's metric.

The head finder (``analysis.heads.finder``) ranks heads by how much of the correct-vs-flipped gap in
P(true) their resample ablation at the readout slots closes. A test of that finder needs a ground
truth that does not come from the same measurement. Two criteria that do not ablate anything:

* **Weights.** A last-layer head whose output matrix ``W_O`` is all zero writes nothing, so it
  cannot read labels for the output (``models.organism.live_heads``). The pruned organisms keep
  one live last-layer head: that head is their reader by construction.
* **Path patching** (``analysis.patching.paths.path_patch``; the ``mechicl circuit`` definition).
  For every head ``h`` of the last layer: the effect on the answer - foil logit difference of each
  earlier head's clean output (at ``positions``, default every position) reaching ``h`` only
  through ``h``'s query, key or value input, with the MLPs recomputed (Wang et al.), in the
  ``denoise`` direction (clean into the flipped-label run), normalised 0 = flipped, 1 = clean,
  with a 95% t-interval over contexts. ``h``'s **path score** is its strongest such path. A head
  is a **reader** when it is live and its strongest path's interval lies above ``min_effect``;
  readers are ranked by path score. A model whose clean - corrupted LD difference has a 95%
  interval that includes 0 has no label effect to route: no reader (its normalised paths are noise).

The path criterion measures the flow of label information *into* a head and out through its own
``z`` at the query slot; the finder measures what is lost when that ``z`` is replaced at every
readout slot k >= k_min. They agree when the head is the route, which is what a test of the
finder checks (``tests/analysis/heads/test_ground_truth.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from mechicl.analysis.engine.hooks import Head, fmt_heads
from mechicl.analysis.patching.exact import Patcher
from mechicl.analysis.patching.paths import path_patch
from mechicl.analysis.stats import t_interval
from mechicl.models.organism import live_heads


@dataclass(frozen=True)
class GroundTruth:
    """Readers of one model's last layer: ``readers`` ranked by path score; ``live`` from the weights;
    ``paths`` one row per last-layer head (its strongest path, with CI, and ``live`` / ``reader``).

    Cost (``ground_truth_readers``): ``path_patch`` once: one forward per sender layer plus one per
    (receiver head, input) with ``n_senders x n_contexts`` rows from the last layer (well under a
    second on an organism with 32 contexts).
    """

    readers: tuple[Head, ...]
    live: tuple[Head, ...]
    paths: pd.DataFrame = field(repr=False)
    gap: tuple[float, float, float] = (0.0, 0.0, 0.0)  # LD clean - corrupted: mean, 95% t-interval over contexts
    min_effect: float = 0.1
    positions: str = "all"

    @property
    def has_effect(self) -> bool:
        return self.gap[1] > 0

    @property
    def rule(self) -> str:
        if not self.has_effect:
            return (
                f"no label effect to route: LD clean - corrupted {self.gap[0]:.3f} "
                f"[{self.gap[1]:.3f}, {self.gap[2]:.3f}] includes 0; no reader"
            )
        return (
            f"live last-layer heads whose strongest path from an earlier head's output ({self.positions} positions, "
            f"MLPs recomputed, denoise) into their q, k or v has a 95% CI above {self.min_effect}: "
            f"{fmt_heads(list(self.readers)) or 'none'}"
        )


def reader_paths(patcher: Patcher, positions: str = "all", mlps: str = "recomputed") -> pd.DataFrame:
    """Per head of the last layer: its strongest path (sender, input) from any head of the layers below.

    Columns: ``layer``, ``head``, ``sender``, ``input``, ``effect``, ``ci_low``, ``ci_high``,
    ``n_contexts``. Cost: one ``path_patch`` (denoise) from every earlier head into every last-layer head.
    """
    cfg = patcher.model.cfg
    last = int(cfg.n_layers) - 1
    senders = [(l, h) for l in range(last) for h in range(int(cfg.n_heads))]
    receivers = [(last, h) for h in range(int(cfg.n_heads))]
    t = path_patch(patcher, senders, receivers, positions, "denoise", mlps=mlps).table()
    t = t[t["input"] != "logits"]
    best = t.loc[t.groupby("receiver_head")["effect"].idxmax()]
    return (
        pd.DataFrame(
            {
                "layer": last,
                "head": best["receiver_head"].astype(int).to_numpy(),
                "sender": best["sender"].to_numpy(),
                "input": best["input"].to_numpy(),
                "effect": best["effect"].to_numpy(),
                "ci_low": best["ci_low"].to_numpy(),
                "ci_high": best["ci_high"].to_numpy(),
                "n_contexts": best["n_contexts"].to_numpy(),
            }
        )
        .sort_values("head")
        .reset_index(drop=True)
    )


def ground_truth_readers(model: Any, patcher: Patcher, min_effect: float = 0.1, positions: str = "all") -> GroundTruth:
    """The organism's label-reading heads by the weights and path patching (module docstring).

    ``model`` is an organism bridge (``live_heads`` reads its ``W_O``); ``patcher`` holds a correct- vs
    flipped-label pair on contexts of the caller's choosing (held out from whatever is being tested).
    """
    paths = reader_paths(patcher, positions)
    last = int(model.cfg.n_layers) - 1
    live = tuple((last, h) for h in live_heads(model, last))
    paths = paths.assign(live=[(last, int(h)) in live for h in paths["head"]])
    gap = t_interval((patcher.baseline("clean") - patcher.baseline("corrupted")).cpu().numpy())
    paths = paths.assign(reader=paths["live"] & (paths["ci_low"] > min_effect) & (gap[1] > 0))
    ranked = paths[paths["reader"]].sort_values("effect", ascending=False, kind="stable")
    readers = tuple((last, int(h)) for h in ranked["head"])
    return GroundTruth(readers, live, paths, gap, min_effect, positions)
