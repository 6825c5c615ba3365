"""`mechicl prior`'s held-out parts: the three disjoint draws, the prior-head finder and the dose-response tables.

Draws (``data.batches.stage_draws``, disjoint pools of task rows): the **screen** and **confirm** draws only select
prior heads (their queries alone, k = 0); every measurement the run reports (moderation, routes, dose, and the
prior heads' validation) is on the **validate** draw's contexts. Methods: ``analysis.prior``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import pandas as pd

from mechicl.analysis.engine.hooks import Head
from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.analysis.heads.ablation import HeadAblation
from mechicl.analysis.prior.dose import dose_response, dose_table
from mechicl.analysis.prior.prior_heads import screen_and_confirm, validate_prior_heads
from mechicl.analysis.stats import mean_ci
from mechicl.data.batches import query_batch, stage_draws
from mechicl.data.names import head_name
from mechicl.data.prompts import PromptBatch, build_prompt_batch
from mechicl.data.task import Task
from mechicl.models.base import LoadedModel

SELECT_SIZES = {"screen": 4, "confirm": 8}  # contexts whose rows become the screening / confirmation queries


@dataclass(frozen=True)
class PriorDraws:
    """The validate draw's two renderings, and every stage's distinct rows as queries alone (k = 0)."""

    correct: PromptBatch
    flipped: PromptBatch
    queries: dict[str, PromptBatch]  # stage -> its rows alone


def prior_draws(
    loaded: LoadedModel, task: Task, n_contexts: int, n_examples: int, seed: int, exclude: Collection[int] = ()
) -> PriorDraws:
    """``exclude``: task rows no draw may hold (e.g. the rows a head finder selected on). Cost: tokenisation only."""
    draws = stage_draws(task, {**SELECT_SIZES, "validate": n_contexts}, n_examples, seed=seed, exclude=exclude)
    kw: dict[str, Any] = dict(n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    ids = draws.ids["validate"]
    correct, flipped = (
        build_prompt_batch(task, loaded.tokenizer, ids, c, seed=seed, **kw) for c in ("default", "flipped")
    )
    rows = {s: draws.ids[s].reshape(-1).tolist() for s in draws.ids}
    return PriorDraws(correct, flipped, {s: query_batch(task, loaded.tokenizer, r, **kw) for s, r in rows.items()})


def prior_heads_tables(
    loaded: LoadedModel,
    d: PriorDraws,
    abl: HeadAblation,
    find: bool,
    named: list[Head],
    seed: int,
    n_boot: int = 2000,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(screen/confirm table, validation table). ``find``: the finder selects on the screen and confirm draws;
    ``named``: pre-registered heads validated beside them (``selected_by`` says which). Cost:
    ``analysis.prior.prior_heads`` on the three draws."""
    q = {s: ReadoutStepper(loaded.model, b) for s, b in d.queries.items()}
    selected, top = (
        screen_and_confirm(q["screen"], q["confirm"], n_boot=n_boot, seed=seed) if find else (pd.DataFrame(), [])
    )
    heads = list(dict.fromkeys(top + named))
    if not heads:
        return selected, pd.DataFrame()
    gap_low = float(mean_ci(abl.gap, n_boot=n_boot, seed=seed, items=abl.items)[1])
    if not gap_low > 0:  # no in-context effect on this draw: roles (and so prior heads) are undefined
        return selected, pd.DataFrame({"heads": [head_name(*x) for x in heads], "note": "no in-context gap"})
    val = validate_prior_heads(loaded.model, q["validate"], abl, heads, gap_low, n_boot=n_boot, seed=seed)
    by = {head_name(*x): " + ".join(w for w, group in (("finder", top), ("named", named)) if x in group) for x in heads}
    return selected, val.assign(selected_by=[by[h] for h in val.heads])


def dose_tables(
    abl: HeadAblation,
    label_sets: list[list[Head]],
    prior_sets: list[list[Head]],
    k_groups: list[tuple[int, int]],
    seed: int,
    n_boot: int = 2000,
) -> pd.DataFrame:
    """The dose-response table of every label set (its label signal scaled) and prior set (its output scaled).
    Cost: 6 re-runs of ``S`` one-token steps per context per set."""
    st = abl.st
    runs = [(s, "label") for s in label_sets] + [(s, "output") for s in prior_sets]
    tabs = [
        dose_table(dose_response(st["correct"], st["flipped"], s, kind=kind), k_groups, n_boot=n_boot, seed=seed)
        for s, kind in runs
    ]
    return pd.concat(tabs, ignore_index=True) if tabs else pd.DataFrame()
