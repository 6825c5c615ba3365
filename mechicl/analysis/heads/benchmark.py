"""A head-finding benchmark with planted ground truth: every method's selected heads scored against the label heads
that an organism's construction or pruning mask fixes (never against a method being scored).

**Suite.** An ``Organism`` is a model with its ``Truth``: ``label_heads`` (the heads that read the shown labels at
the readout slot), and the planted heads that are *not* label heads (``class_heads``, ``prior_carriers``,
``label_movers``) and ``inert_heads`` (zero output weights). Constructed organisms: ``models.constructed.planted``
(the recipe). Pruned trained organisms: the live heads of the last layer (``models.organism.live_heads``, the pruning
mask) are the label heads and the pruned ones are inert; nothing else is known about them, so their other roles are
empty. An organism enters the suite only with an in-context effect (``icl_check``: the correct-vs-flipped gap in
P(true) with a 95% CI above 0); without it there is no reader to find.

**Methods** (``METHODS``), each ``(organism, task, sizes) -> selected heads``: exact head patching (denoise, kinds
``head_out`` / ``head_out_readout`` / ``head_out_label``), attribution patching (``head_out``), AttAttr (a head's
attribution summed over query/key pairs, mean over contexts), path IG (per head), top ``n`` by score with ``n`` = the
number of planted label heads; and the held-out finder with each ablation mode, selecting its ``above_control`` heads.

**Scores** (``score_selection``): precision = label heads selected / heads selected (NaN when nothing is selected),
recall = label heads selected / label heads; and whether the selection holds a class head, a prior carrier, a label
mover or an inert head. ``summary`` averages over organisms with percentile-bootstrap CIs over organisms
(``analysis.stats.mean_ci``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from mechicl.analysis.gradients.attattr import attattr
from mechicl.analysis.gradients.path_ig import path_ig
from mechicl.analysis.heads.ablation import MODES, HeadAblation
from mechicl.analysis.heads.finder import FindingsConfig, find_label_heads
from mechicl.analysis.patching.attribution import attribution_patch
from mechicl.analysis.patching.exact import Patcher
from mechicl.analysis.stats import mean_ci
from mechicl.data.batches import held_out_batches, stage_draws
from mechicl.data.names import head_name
from mechicl.data.pairs import PatchPair, pair_for
from mechicl.data.task import Task
from mechicl.models.constructed import planted
from mechicl.models.organism import live_heads
from mechicl.models.registry import CONSTRUCTED

ROLES = ("class_heads", "prior_carriers", "label_movers", "inert_heads")


@dataclass(frozen=True)
class Truth:
    """Planted roles of one organism's heads (``L<l>H<h>`` names) and where they come from."""

    label_heads: tuple[str, ...]
    class_heads: tuple[str, ...] = ()
    prior_carriers: tuple[str, ...] = ()
    label_movers: tuple[str, ...] = ()
    inert_heads: tuple[str, ...] = ()
    source: str = ""

    @property
    def non_label(self) -> tuple[str, ...]:
        """Planted heads with a role that is not reading labels (the label-specificity failure's targets)."""
        return self.class_heads + self.prior_carriers + self.label_movers


@dataclass(frozen=True)
class Organism:
    name: str
    loaded: Any = field(repr=False)  # a models.base.LoadedModel
    truth: Truth


@dataclass(frozen=True)
class Sizes:
    """Contexts per method. Cost on an organism (2 layers, 4 heads, k = 10): seconds per organism and method."""

    k: int = 10
    n_pair: int = 24  # contexts of the patching / gradient pair
    n_check: int = 32  # contexts of the in-context-effect check
    finder: FindingsConfig = FindingsConfig(
        k=10, k_min=4, n_screen=6, n_confirm=8, n_validate=16, n_candidates=4, n_top=2, n_control=3, n_boot=500
    )
    ig_steps: int = 16
    seed: int = 0
    n_boot: int = 2000


def trained_truth(loaded: Any) -> Truth:
    """A pruned organism's label heads: the live heads of its last layer (the pruning mask); the rest are inert."""
    L, H = int(loaded.model.cfg.n_layers), int(loaded.model.cfg.n_heads)
    live = live_heads(loaded.model, L - 1)
    return Truth(
        label_heads=tuple(head_name(L - 1, h) for h in live),
        inert_heads=tuple(head_name(L - 1, h) for h in range(H) if h not in live),
        source="pruning mask (live last-layer heads)",
    )


def constructed_truth(name: str) -> Truth:
    """A constructed organism's planted roles, from its recipe (``models.constructed.planted``)."""
    p = planted(name)
    roles = {r: tuple(getattr(p, r, ())) for r in ROLES}
    return Truth(label_heads=tuple(p.label_heads), **roles, source="construction (models.constructed.planted)")


def truth_for(name: str, loaded: Any) -> Truth:
    return constructed_truth(name) if name in CONSTRUCTED else trained_truth(loaded)


def icl_check(loaded: Any, task: Task, sizes: Sizes) -> dict[str, float]:
    """The correct-vs-flipped gap in P(true) (mean over slots k >= k_min) with a 95% context-bootstrap CI, on its
    own draw (seed ``sizes.seed + 100``), and the accuracy against the true label at the last slot per condition
    (below 0.5 on flipped contexts: the model follows flipped labels). Cost: 2 forwards of ``n_check`` contexts."""
    pair = pair_for(loaded, task, sizes.n_check, sizes.k + 1, seed=sizes.seed + 100)
    abl = HeadAblation(loaded.model, pair.clean, pair.corrupted, sizes.finder.k_min, mode="zero")
    gap, lo, hi = mean_ci(abl.gap, n_boot=sizes.n_boot, seed=sizes.seed)
    acc = {f"acc_{c}_last": float(abl.acc_last[c].mean()) for c in ("correct", "flipped")}  # vs the true label
    return {"gap": float(gap), "gap_ci_low": float(lo), "gap_ci_high": float(hi), **acc}


def top_n(scores: torch.Tensor | np.ndarray, n: int) -> list[str]:
    """The ``n`` heads with the largest ``scores [layer, head]`` (signed: towards the correct-label run)."""
    s = np.asarray(torch.as_tensor(scores, dtype=torch.float64).nan_to_num(float("-inf")))
    order = np.argsort(-s.reshape(-1), kind="stable")[:n]
    return [head_name(int(i) // s.shape[1], int(i) % s.shape[1]) for i in order]


def build_suite(models: dict[str, Any], task: Task, sizes: Sizes) -> tuple[list[Organism], pd.DataFrame]:
    """The organisms of ``models`` (name -> LoadedModel) that have planted label heads and an in-context effect,
    and one row per model saying whether it entered and why not. A trained organism without pruned heads (every
    last-layer head live) has no planted reader. Cost: ``icl_check`` per model."""
    suite, rows = [], []
    for name, loaded in models.items():
        truth = truth_for(name, loaded)
        check = icl_check(loaded, task, sizes)
        reason = ""
        if not check["gap_ci_low"] > 0:
            reason = "no in-context effect (correct-vs-flipped gap CI not above 0): no reader to find"
        elif name not in CONSTRUCTED and not truth.inert_heads:
            reason = "not pruned: every last-layer head is live, so no planted reader"
        rows.append({"organism": name, **check, "label_heads": ",".join(truth.label_heads), "excluded": reason})
        if not reason:
            suite.append(Organism(name, loaded, truth))
    return suite, pd.DataFrame(rows)


# ----------------------------------------------------------------- methods ---

Method = Callable[[Organism, Task, Sizes, dict], list[str]]
"""(organism, task, sizes, cache) -> selected heads; ``cache`` holds the organism's pair and patcher."""


def _pair(org: Organism, task: Task, sizes: Sizes, cache: dict) -> tuple[PatchPair, Patcher]:
    if "pair" not in cache:
        pair = pair_for(org.loaded, task, sizes.n_pair, sizes.k + 1, seed=sizes.seed)
        cache["pair"] = (pair, Patcher(org.loaded.model, pair))
    return cache["pair"]


def _patching(kind: str) -> Method:
    def select(org: Organism, task: Task, sizes: Sizes, cache: dict) -> list[str]:
        _, patcher = _pair(org, task, sizes, cache)
        return top_n(patcher.sweep(kind, "denoise").effect, len(org.truth.label_heads))

    return select


def _attribution(org: Organism, task: Task, sizes: Sizes, cache: dict) -> list[str]:
    pair, _ = _pair(org, task, sizes, cache)
    est = attribution_patch(org.loaded.model, pair, ("head_out",), "denoise")["head_out"]
    return top_n(est.effect, len(org.truth.label_heads))


def _attattr(org: Organism, task: Task, sizes: Sizes, cache: dict) -> list[str]:
    pair, _ = _pair(org, task, sizes, cache)
    res = attattr(org.loaded.model, pair.clean, pair.answer, pair.foil, steps=sizes.ig_steps)
    return top_n(torch.stack([r.attr.sum((2, 3)).mean(0) for r in res]), len(org.truth.label_heads))


def _path_ig(org: Organism, task: Task, sizes: Sizes, cache: dict) -> list[str]:
    pair, patcher = _pair(org, task, sizes, cache)
    res = path_ig(org.loaded.model, pair, steps=sizes.ig_steps, patcher=patcher)
    return top_n(res.heads, len(org.truth.label_heads))


def _finder(mode: str) -> Method:
    def select(org: Organism, task: Task, sizes: Sizes, cache: dict) -> list[str]:
        cfg = replace(sizes.finder, ablation=mode, seed=sizes.seed)
        draws = stage_draws(task, cfg.sizes, cfg.k + 1, seed=cfg.seed)
        kw = dict(n_ctx=org.loaded.n_ctx, prepend_bos=org.loaded.prepend_bos)
        res = find_label_heads(org.loaded.model, held_out_batches(task, org.loaded.tokenizer, draws, **kw), cfg, False)
        v = res.validate
        return list(v.heads[v.above_control]) if len(v) else []

    return select


FINDER_MODES = ("resample", "mean", "mean_condition", "zero", "interchange")
METHODS: dict[str, Method] = {
    "patch head_out": _patching("head_out"),
    "patch head_out_readout": _patching("head_out_readout"),
    "patch head_out_label": _patching("head_out_label"),
    "attribution patching": _attribution,
    "AttAttr": _attattr,
    "path IG": _path_ig,
    **{f"finder {m}": _finder(m) for m in FINDER_MODES if m in MODES},
}


# ----------------------------------------------------------------- scoring ---


def score_selection(selected: Sequence[str], truth: Truth) -> dict[str, Any]:
    """Precision and recall of ``selected`` against ``truth.label_heads``; which other planted roles it holds."""
    sel, gold = set(selected), set(truth.label_heads)
    hit = len(sel & gold)
    out: dict[str, Any] = {
        "selected": ",".join(selected),
        "n_selected": len(sel),
        "n_label_heads": len(gold),
        "hits": hit,
        "precision": hit / len(sel) if sel else float("nan"),
        "recall": hit / len(gold) if gold else float("nan"),
        "non_label_known": bool(truth.non_label),
        "selected_non_label": bool(sel & set(truth.non_label)),
    }
    for role in ROLES:
        out[f"selected_{role.rstrip('s')}"] = bool(sel & set(getattr(truth, role)))
    return out


def score_methods(
    suite: Sequence[Organism],
    task: Task,
    sizes: Sizes | None = None,
    methods: dict[str, Method] | None = None,
) -> pd.DataFrame:
    """One row per organism x method: the selected heads, their scores (``score_selection``) and seconds taken.

    Cost: per organism, 2 cached forwards of ``n_pair`` contexts, one patching sweep per kind, one attribution
    backward, ``(ig_steps + 2)`` forwards and backwards for AttAttr and path IG each, one finder cell per mode."""
    sizes, methods = sizes or Sizes(), methods or METHODS
    rows = []
    for org in suite:
        cache: dict = {}
        for name, method in methods.items():
            t = time.perf_counter()
            selected = method(org, task, sizes, cache)
            rows.append(
                {
                    "organism": org.name,
                    "truth_source": org.truth.source,
                    "label_heads": ",".join(org.truth.label_heads),
                    "method": name,
                    **score_selection(selected, org.truth),
                    "seconds": time.perf_counter() - t,
                }
            )
    return pd.DataFrame(rows)


def summary(rows: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per method: mean precision and recall over organisms with 95% CIs (organisms resampled), the share of
    organisms where it selected nothing, a non-label planted head (of those with one known), an inert head."""
    out = []
    for method, g in rows.groupby("method", sort=False):
        r: dict[str, Any] = {"method": method, "n_organisms": len(g)}
        for col, x in (("precision", g.precision.dropna()), ("recall", g.recall)):
            m, lo, hi = mean_ci(x.to_numpy(float), n_boot=n_boot, seed=seed) if len(x) else (np.nan,) * 3
            r.update({col: float(m), f"{col}_ci_low": float(lo), f"{col}_ci_high": float(hi)})
        known = g[g.non_label_known]
        r["empty_rate"] = float((g.n_selected == 0).mean())
        r["non_label_rate"] = float(known.selected_non_label.mean()) if len(known) else float("nan")
        r["n_non_label_known"] = len(known)
        r["inert_rate"] = float(g.selected_inert_head.mean())
        out.append(r)
    return pd.DataFrame(out)
