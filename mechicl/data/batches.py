"""Derived renderings of the same contexts: zero-shot queries, held-out stage draws, random tokens.

Each builder returns PromptBatches (or plain token tensors) that an analysis receives ready-made;
no analysis builds a batch itself. Cost: tokenization only.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from mechicl.data.prompts import PromptBatch, build_prompt_batch
from mechicl.data.task import Task, Template
from mechicl.errors import PromptError


def zero_shot_batch(
    task: Task, tokenizer: Any, batch: PromptBatch, *, n_ctx: int, prepend_bos: bool, template: Template | None = None
) -> PromptBatch:
    """Every example of ``batch`` alone, with no demonstrations (k = 0), written with the same label words."""
    words = tuple(batch.label_words)
    cond = "default" if words == tuple(task.label_names) else f"arbitrary:{'/'.join(words)}"
    ids = batch.example_ids.reshape(-1, 1)
    return build_prompt_batch(task, tokenizer, ids, cond, n_ctx=n_ctx, prepend_bos=prepend_bos, template=template)


def query_batch(
    task: Task,
    tokenizer: Any,
    rows: Collection[int],
    *,
    n_ctx: int,
    prepend_bos: bool,
    template: Template | None = None,
) -> PromptBatch:
    """Each distinct task row in ``rows`` alone (k = 0, the default label words), in sorted order: one query per
    row, so queries from contexts that shared rows are not counted twice."""
    ids = torch.as_tensor(sorted(set(int(r) for r in rows)), dtype=torch.long).reshape(-1, 1)
    return build_prompt_batch(task, tokenizer, ids, "default", n_ctx=n_ctx, prepend_bos=prepend_bos, template=template)


STAGES = ("screen", "confirm", "validate")


@dataclass(frozen=True)
class StageDraws:
    """Context draws for held-out stages: ``ids[stage]`` is ``[n_contexts, n_examples]`` task rows.

    The stages draw from disjoint pools of task rows (a seeded, class-stratified split), so no
    context, and no example, is shared between stages; ``seeds[stage]`` is the seed of its draw.
    """

    ids: dict[str, Int[Tensor, "batch example"]]
    seeds: dict[str, int]
    pools: dict[str, tuple[int, ...]]

    def shared_examples(self) -> set[int]:
        """Task rows that occur in more than one stage (empty by construction)."""
        seen: dict[int, str] = {}
        shared = set()
        for stage, ids in self.ids.items():
            for r in set(ids.reshape(-1).tolist()):
                if seen.setdefault(r, stage) != stage:
                    shared.add(r)
        return shared


def stage_draws(
    task: Task, sizes: dict[str, int], n_examples: int, seed: int = 0, exclude: Collection[int] = ()
) -> StageDraws:
    """Draw ``sizes[stage]`` contexts of ``n_examples`` rows per stage from disjoint, class-stratified pools.

    ``exclude``: task rows no pool may hold (e.g. every row earlier seeds' draws used: ``used_rows``), so a
    confirmation runs on rows never seen before. Raises ``PromptError`` when a pool (``len(task) / len(sizes)``
    rows, less the excluded ones) is smaller than a context.
    """
    stages = list(sizes)
    rng = np.random.default_rng([seed, 7919])
    labels = np.asarray(task.labels)
    keep = np.ones(len(labels), dtype=bool)
    keep[np.asarray(sorted(set(exclude)), dtype=int)] = False
    pools: dict[str, list[int]] = {s: [] for s in stages}
    for c in range(len(task.label_names)):  # deal each class's rows round-robin: pools stay balanced
        rows = rng.permutation(np.flatnonzero((labels == c) & keep))
        for i, s in enumerate(stages):
            pools[s] += rows[i :: len(stages)].tolist()
    ids, seeds = {}, {}
    for i, s in enumerate(stages):
        pool = np.sort(np.asarray(pools[s]))
        if n_examples > len(pool):
            raise PromptError(
                f"stage {s!r} draws from {len(pool)} of the task's {len(task)} rows (disjoint pools for {len(stages)} "
                f"stages, {len(labels) - int(keep.sum())} rows excluded), fewer than the {n_examples} examples a "
                "context needs: lower --k, exclude fewer seeds' rows or use a larger task"
            )
        seeds[s] = seed * 1000 + i
        r = np.random.default_rng(seeds[s])
        ids[s] = torch.as_tensor(
            np.stack([pool[r.choice(len(pool), n_examples, replace=False)] for _ in range(sizes[s])])
        )
    draws = StageDraws(ids, seeds, {s: tuple(int(x) for x in pools[s]) for s in stages})
    assert not draws.shared_examples(), "held-out stages share task rows"
    return draws


def used_rows(
    task: Task,
    sizes: dict[str, int],
    n_examples: int,
    seeds: Collection[int],
    load: Callable[[int], Task] | None = None,
) -> set[int]:
    """Rows of ``task`` whose text any of ``seeds``' ``stage_draws`` (these sizes) put into a context.

    ``load(seed)``: the task as that seed's cell loaded it. Built-in tasks are class-balanced per seed, so the same
    row number is a different text under another seed: rows are matched by text, never by number (a text that
    occurs twice is excluded wherever it occurs: conservative)."""
    texts: set[str] = set()
    for s in seeds:
        t = load(s) if load is not None else task
        for ids in stage_draws(t, sizes, n_examples, s).ids.values():
            texts.update(t.texts[int(i)] for i in ids.ravel())
    return {i for i, x in enumerate(task.texts) if x in texts}


@dataclass(frozen=True)
class HeldOutBatches:
    """Correct- and flipped-label renderings of each stage's contexts, and the validation queries alone.

    ``stages[stage] = (correct, flipped)``; ``zero_shot``: the last example of every validation
    context alone (k = 0). Memory: ``2 x len(stages) + 1`` PromptBatches.
    """

    stages: dict[str, tuple[PromptBatch, PromptBatch]]
    zero_shot: PromptBatch
    draws: StageDraws


def held_out_batches(
    task: Task, tokenizer: Any, draws: StageDraws, *, n_ctx: int, prepend_bos: bool, template: Template | None = None
) -> HeldOutBatches:
    """The renderings ``analysis.heads.finder`` reads, built from ``stage_draws``."""
    kw: dict[str, Any] = dict(n_ctx=n_ctx, prepend_bos=prepend_bos, template=template)
    stages = {
        s: (
            build_prompt_batch(task, tokenizer, ids, "default", **kw),
            build_prompt_batch(task, tokenizer, ids, "flipped", **kw),
        )
        for s, ids in draws.ids.items()
    }
    last = draws.ids[STAGES[-1]][:, -1:]
    return HeldOutBatches(stages, build_prompt_batch(task, tokenizer, last, "default", **kw), draws)


def repeated_random_tokens(
    tokenizer: Any, d_vocab: int, prepend_bos: bool, n_seqs: int = 8, seq_len: int = 40, seed: int = 0
) -> tuple[Int[Tensor, "batch pos"], int]:
    """``[BOS] r r`` with ``r`` uniform over the non-special vocabulary; returns tokens and the offset of copy 1."""
    vocab = min(int(d_vocab), len(tokenizer))
    special = set(tokenizer.all_special_ids)
    allowed = np.array([i for i in range(vocab) if i not in special])
    rng = np.random.default_rng(seed)
    r = torch.as_tensor(allowed[rng.integers(0, len(allowed), size=(n_seqs, seq_len))], dtype=torch.long)
    parts = [r, r]
    if prepend_bos:
        parts.insert(0, torch.full((n_seqs, 1), tokenizer.bos_token_id, dtype=torch.long))
    return torch.cat(parts, dim=1), int(prepend_bos)
