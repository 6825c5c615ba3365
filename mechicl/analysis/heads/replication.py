"""Replication across cells (model x task x seed) of the findings grid: which heads hold up where.

**Voting cells.** Per model, a cell votes when it has an in-context effect to attribute (its gap CI above 0)
*and* its gap in P(true) is at least ``min_gap`` (``MIN_GAP``, 0.05): a cell whose labels barely move the model
cannot say much about any head, so its absences are not counted against one.

**Verdicts** (``verdict``), over the voting cells:

* **too few voting cells**: the model has fewer than ``MIN_CELLS`` (3) voting cells;
* **replicates**: above its matched controls (``above_control``) in at least ``share`` (2/3) of the voting cells;
* **task-specific: <task>**: in at least ``share`` of one task's voting cells (and at least 2), not across the grid;
* **not robust**: above control somewhere, but neither of the above.

In a *discovery* grid a head is tested only where the finder selected it, so a cell that did not select it counts
as a failure there (``n_tested`` says how many cells tested it). In a *pre-registered* grid (``FindingsConfig.heads``)
every named head is tested in every cell, so the verdict reads the same counts without that selection. Effect
medians (``effect_median``) are over the voting cells where the head was tested; ``roles`` counts the roles it got
there (``analysis.heads.roles``) and ``role`` is the most frequent (tied roles joined by " / ").

Task agreement: the Spearman correlation, between two tasks, of every head's screening effect
(exact, or first-order with ``screen="attribution"``; mean over seeds). Inputs are the per-cell tables ``runs.findings`` writes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats as sps

from mechicl.data.names import head_name

REPLICATES, NOT_ROBUST, TOO_FEW = "replicates", "not robust", "too few voting cells"
MIN_CELLS = 3  # fewer voting cells than this cannot show replication (2 of 2 is one coincidence away)
MIN_GAP = 0.05  # the smallest correct-vs-flipped gap in P(true) with which a cell votes


@dataclass(frozen=True)
class CellTables:
    """What replication reads from one cell: its identity, whether it has an effect, and its tables."""

    model: str
    task: str
    seed: int
    has_effect: bool
    baseline: dict[str, float]
    screen: pd.DataFrame = field(repr=False)  # layer, head, effect_est
    validate: pd.DataFrame = field(repr=False)  # layer, head, effect(_ci_low/_high), above_control, ...
    sets: pd.DataFrame = field(
        default_factory=pd.DataFrame, repr=False
    )  # test, effect, control_mean, gap_reduction, ...
    seconds: float = float("nan")
    preregistered: bool = False  # the cell validated named heads (no screening)

    def votes(self, min_gap: float = MIN_GAP) -> bool:
        """Whether the cell votes: an in-context effect (gap CI above 0) of at least ``min_gap``."""
        return bool(self.has_effect and self.baseline.get("gap", float("nan")) >= min_gap)


@dataclass(frozen=True)
class Replication:
    """``cells``: one row per cell; ``heads``: one row per (model, head) that was validated anywhere, with
    counts and its verdict; ``task_agreement``: Spearman between tasks per model; ``effect_maps``:
    mean screening effect per (model, task, layer, head)."""

    cells: pd.DataFrame
    heads: pd.DataFrame
    task_agreement: pd.DataFrame
    effect_maps: pd.DataFrame


def _cell_rows(cells: list[CellTables], min_gap: float) -> pd.DataFrame:
    rows = []
    for c in cells:
        v = c.validate
        above = v[v.above_control] if len(v) else v
        top_set = c.sets[c.sets.test.str.startswith("top ")] if len(c.sets) else c.sets
        t = top_set.iloc[0] if len(top_set) else None
        rows.append(
            {
                "model": c.model,
                "task": c.task,
                "seed": c.seed,
                "has_effect": c.has_effect,
                "votes": c.votes(min_gap),
                "preregistered": c.preregistered,
                **{
                    k: c.baseline.get(k, np.nan)
                    for k in ("gap", "gap_ci_low", "gap_ci_high", "icl_gain", "icl_gain_ci_low", "icl_gain_ci_high")
                },
                "top_heads": " ".join(head_name(r.layer, r.head) for r in v.itertuples()) if len(v) else "",
                "above_control": " ".join(head_name(r.layer, r.head) for r in above.itertuples()) if len(v) else "",
                "top_set_effect": np.nan if t is None else t.effect,
                "top_set_control": np.nan if t is None else t.control_mean,
                "top_set_gap_reduction": np.nan if t is None else t.get("gap_reduction", np.nan),
                "top_set_control_gap_reduction": np.nan if t is None else t.get("control_gap_reduction", np.nan),
                "top_set_above_control": None if t is None else bool(t.above_control),
                "seconds": c.seconds,
            }
        )
    return pd.DataFrame(rows)


def verdict(per_task: dict[str, tuple[int, int]], n_above: int, n_cells: int, share: float = 2 / 3) -> str:
    """The replication verdict from counts: ``per_task[task] = (cells above control, voting cells)``."""
    if n_cells < MIN_CELLS:
        return TOO_FEW
    if n_above >= share * n_cells:
        return REPLICATES
    specific = [t for t, (a, n) in per_task.items() if n >= 2 and a >= share * n]
    return f"task-specific: {', '.join(specific)}" if specific else NOT_ROBUST


def _roles(g: pd.DataFrame) -> tuple[str, str]:
    """(counts text, most frequent role) of a head's tested cells; ("", "") for cells written before roles."""
    if "role" not in g or g.role.isna().all():
        return "", ""
    counts = g.role.value_counts()
    top = [str(r) for r, n in counts.items() if n == counts.iloc[0]]  # a tie names every tied role
    return "; ".join(f"{r} {n}" for r, n in counts.items()), " / ".join(sorted(top))


def _head_rows(cells: list[CellTables], model: str, share: float, min_gap: float) -> list[dict]:
    mine = [c for c in cells if c.model == model and c.votes(min_gap)]
    val = [c.validate.assign(task=c.task, seed=c.seed) for c in mine if len(c.validate)]
    if not val:
        return []
    v = pd.concat(val, ignore_index=True)
    rows = []
    for (l, h), g in v.groupby(["layer", "head"]):
        per_task = {
            t: (int(g[(g.task == t)].above_control.sum()), sum(c.task == t for c in mine))
            for t in dict.fromkeys(c.task for c in mine)
        }
        n_above = int(g.above_control.sum())
        roles, role = _roles(g)
        rows.append(
            {
                "model": model,
                "head": head_name(l, h),
                "layer": int(l),
                "head_index": int(h),
                "design": "pre-registered" if all(c.preregistered for c in mine) else "discovery",
                "n_cells": len(mine),
                "n_tested": len(g),
                "n_above_control": n_above,
                "share_above_control": n_above / len(mine),
                "effect_median": float(g.effect.median()),
                "effect_min": float(g.effect.min()),
                "effect_max": float(g.effect.max()),
                "effect_ci_low_min": float(g.effect_ci_low.min()),
                "control_mean_median": float(g.control_mean.median()),
                "role": role,
                "roles": roles,
                "per_task": "; ".join(f"{t} {a}/{n}" for t, (a, n) in per_task.items()),
                "verdict": verdict(per_task, n_above, len(mine), share),
            }
        )
    return rows


def _maps(cells: list[CellTables]) -> pd.DataFrame:
    def one(c: CellTables) -> pd.DataFrame:  # the exact screening effect where there is one, else the estimate
        col = "effect" if "effect" in c.screen else "effect_est"
        return (
            c.screen[["layer", "head", col]]
            .rename(columns={col: "effect"})
            .assign(model=c.model, task=c.task, seed=c.seed, exact=col == "effect")
        )

    s = [one(c) for c in cells if c.has_effect and len(c.screen) and "layer" in c.screen]
    if not s:
        return pd.DataFrame(columns=["model", "task", "layer", "head", "effect", "exact", "n_seeds"])
    df = pd.concat(s, ignore_index=True)
    return df.groupby(["model", "task", "layer", "head"], as_index=False).agg(
        effect=("effect", "mean"), exact=("exact", "all"), n_seeds=("seed", "nunique")
    )


def _agreement(maps: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for model, g in maps.groupby("model"):
        wide = g.pivot_table(index=["layer", "head"], columns="task", values="effect")
        for a, b in itertools.combinations(wide.columns, 2):
            ok = wide[[a, b]].dropna()
            rho = sps.spearmanr(ok[a], ok[b]).statistic if len(ok) > 2 else np.nan
            rows.append({"model": model, "task_a": a, "task_b": b, "spearman": float(rho), "n_heads": len(ok)})
    return pd.DataFrame(rows, columns=["model", "task_a", "task_b", "spearman", "n_heads"])


def replicate(cells: list[CellTables], share: float = 2 / 3, min_gap: float = MIN_GAP) -> Replication:
    """The grid's replication tables from its finished cells (see the module docstring). Cost: negligible."""
    if not cells:
        raise ValueError("no finished cells to summarise")
    heads = [r for m in dict.fromkeys(c.model for c in cells) for r in _head_rows(cells, m, share, min_gap)]
    hdf = pd.DataFrame(heads)
    if len(hdf):
        hdf = hdf.sort_values(
            ["model", "n_above_control", "effect_median"], ascending=[True, False, False]
        ).reset_index(drop=True)
    maps = _maps(cells)
    return Replication(_cell_rows(cells, min_gap), hdf, _agreement(maps), maps)
