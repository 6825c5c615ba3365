"""Evidence schedules: the same contexts rendered with 0..k of their k demonstration labels flipped.

How many labels are flipped (``count`` m) and where they sit (``placement``):

* ``last``: the m demonstrations nearest the query (``pairs.make_pair(last_m=m)``'s schedule);
* ``first``: the m demonstrations furthest from the query;
* ``spread``: m positions spaced evenly, right-aligned: demonstration ``floor((i + 1) k / m) - 1`` for
  i = 0..m-1, so m = k/2 flips every other one (the odd examples of ``default>flipped@alt``);
* ``random``: m positions drawn per context (seeded), which separates position from count.

m = 0 (every label true) and m = k (every label flipped, the ``flipped`` condition) are the same for
every placement and rendered once (placements ``none`` and ``all``). The query's own label token
(after its readout slot) stays true. Only label tokens differ between renderings of one context.
Cost: tokenization only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechicl.data.conditions import LabelCondition
from mechicl.data.prompts import PromptBatch, build_prompt_batch
from mechicl.data.task import Task, Template
from mechicl.errors import PromptError

PLACEMENTS = ("last", "first", "spread", "random")


def flip_mask(k: int, m: int, placement: str, n_contexts: int = 1, seed: int = 0) -> Bool[Tensor, "batch demo"]:
    """Which of the ``k`` demonstrations show a flipped label, per context (``[n_contexts, k]``)."""
    if placement not in PLACEMENTS:
        raise PromptError(f"unknown placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
    if not 0 <= m <= k:
        raise PromptError(f"cannot flip {m} of {k} demonstration labels; the count must be in 0..{k}")
    mask = np.zeros((n_contexts, k), dtype=bool)
    if placement == "last":
        mask[:, k - m :] = True
    elif placement == "first":
        mask[:, :m] = True
    elif placement == "spread" and m:
        mask[:, [(i + 1) * k // m - 1 for i in range(m)]] = True
    elif placement == "random":
        rng = np.random.default_rng([seed, k, m])
        for b in range(n_contexts):
            mask[b, rng.choice(k, size=m, replace=False)] = True
    return torch.as_tensor(mask)


@dataclass(frozen=True)
class EvidenceBatches:
    """Renderings of one draw of contexts, one PromptBatch per (placement, count).

    ``flips[r, b, j]``: demonstration ``j`` of context ``b`` shows a flipped label in rendering ``r``.
    Rendering 0 is ``none`` (m = 0), the last is ``all`` (m = k). Memory: one PromptBatch per rendering.
    """

    batches: tuple[PromptBatch, ...]
    placement: tuple[str, ...]
    count: tuple[int, ...]
    flips: Bool[Tensor, "rendering batch demo"]

    @property
    def k(self) -> int:
        return int(self.flips.shape[-1])

    @property
    def default(self) -> PromptBatch:
        return self.batches[0]

    @property
    def flipped(self) -> PromptBatch:
        return self.batches[-1]


def evidence_batches(
    task: Task,
    tokenizer: Any,
    example_ids: Int[Tensor, "batch example"],
    *,
    n_ctx: int,
    prepend_bos: bool,
    placements: Sequence[str] = PLACEMENTS,
    counts: Sequence[int] | None = None,
    template: Template | None = None,
    seed: int = 0,
) -> EvidenceBatches:
    """Render ``example_ids`` (the last example is the query) once per (placement, count of flipped labels).

    ``counts`` default to 1..k-1 (0 and k are always rendered, once). ``seed`` seeds the ``random`` placement.
    """
    n, k = example_ids.shape[0], example_ids.shape[1] - 1
    if k < 1:
        raise PromptError("evidence schedules need at least one demonstration before the query (k >= 1)")
    counts = [m for m in (range(1, k) if counts is None else counts) if 0 < m < k]
    kw: dict[str, Any] = dict(n_ctx=n_ctx, prepend_bos=prepend_bos, template=template)
    true = torch.as_tensor(np.asarray(task.labels)[example_ids.numpy()], dtype=torch.long)
    plan = [("none", 0, torch.zeros(n, k, dtype=torch.bool))]
    plan += [(p, m, flip_mask(k, m, p, n, seed)) for p in placements for m in counts]
    plan += [("all", k, torch.ones(n, k, dtype=torch.bool))]
    batches = []
    for p, m, mask in plan:
        shown = true.clone()
        shown[:, :k] = torch.where(mask, (true[:, :k] + 1) % task.n_classes, true[:, :k])
        cond = LabelCondition("default" if m == 0 else "flipped", alias=p if m in (0, k) else f"{p}{m}")
        batches.append(build_prompt_batch(task, tokenizer, example_ids, cond, shown_labels=shown, **kw))
    return EvidenceBatches(
        tuple(batches),
        tuple(p for p, _, _ in plan),
        tuple(m for _, m, _ in plan),
        torch.stack([mask for _, _, mask in plan]),
    )
