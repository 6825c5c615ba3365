"""Patching pairs: one set of contexts rendered with correct labels (clean) and flipped labels (corrupted).

Inputs, query and every token position are identical; only label tokens differ
(``check_pair`` asserts it and names the first difference otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechicl.data.prompts import LABEL, ROLE_NAMES, PromptBatch, build_prompt_batch, sample_contexts
from mechicl.data.task import Task, Template
from mechicl.errors import PairError

# ------------------------------------------------------------------ pairs ---


@dataclass(frozen=True)
class PatchPair:
    """Clean (correct labels) and corrupted (flipped labels) renderings of the same contexts.

    ``answer`` is the class the clean context supports at the query (its shown label),
    ``foil`` the class the corrupted context supports; the metric is
    ``logit(answer) - logit(foil)`` at ``query_pos``. Build with ``make_pair`` or
    ``pair_from_batches`` (both validate). Memory: two PromptBatches.
    """

    clean: PromptBatch
    corrupted: PromptBatch
    answer: Int[Tensor, "batch"]
    foil: Int[Tensor, "batch"]
    description: str = ""

    @property
    def n_contexts(self) -> int:
        return self.clean.n_contexts

    @property
    def query_pos(self) -> Int[Tensor, "batch"]:
        return self.clean.readout_pos[:, -1]

    @property
    def answer_ids(self) -> Int[Tensor, "batch"]:
        return self.clean.label_token_ids[self.answer]

    @property
    def foil_ids(self) -> Int[Tensor, "batch"]:
        return self.clean.label_token_ids[self.foil]

    def run(self, which: str) -> PromptBatch:
        return {"clean": self.clean, "corrupted": self.corrupted}[which]

    def logit_diff(self, label_logits: Float[Tensor, "... batch n_labels"]) -> Float[Tensor, "... batch"]:
        """``logit(answer) - logit(foil)`` from label-set logits at the query slot."""
        idx = torch.stack([self.answer, self.foil], -1).expand(*label_logits.shape[:-1], 2)
        pick = label_logits.gather(-1, idx)
        return pick[..., 0] - pick[..., 1]


def check_pair(clean: PromptBatch, corrupted: PromptBatch) -> None:
    """Raise ``PairError`` unless the two batches differ only in label tokens."""
    if clean.tokens.shape != corrupted.tokens.shape:
        raise PairError(
            f"clean and corrupted token tensors have different shapes {tuple(clean.tokens.shape)} vs "
            f"{tuple(corrupted.tokens.shape)}. Build both from the same example ids with build_prompt_batch."
        )
    for name in ("attention_mask", "label_pos", "readout_pos", "input_spans", "example_ids"):
        a, b = getattr(clean, name), getattr(corrupted, name)
        if a.shape != b.shape or not torch.equal(a, b):
            bad = (a != b).nonzero()[0].tolist() if a.shape == b.shape else "shape"
            what = "lengths" if name == "attention_mask" else name
            raise PairError(
                f"clean and corrupted contexts differ in {what} (first at index {bad}); a patching pair "
                f"needs the same inputs at the same positions. Build both from the same example ids, "
                f"template and tokenizer."
            )
    if not torch.equal(clean.label_token_ids, corrupted.label_token_ids):
        raise PairError(
            f"clean and corrupted runs use different label words {clean.label_words} vs {corrupted.label_words}; "
            f"the logit-difference metric needs one label vocabulary."
        )
    diff = clean.tokens != corrupted.tokens
    off_label = diff & (clean.roles != LABEL)
    if off_label.any():
        r, p = off_label.nonzero()[0].tolist()
        raise PairError(
            f"clean and corrupted contexts differ at a non-label token: context {r}, position {p} "
            f"(role {ROLE_NAMES[int(clean.roles[r, p])]}, token ids {int(clean.tokens[r, p])} vs "
            f"{int(corrupted.tokens[r, p])}). Only label tokens may differ between the two runs."
        )
    if not diff.any():
        raise PairError("clean and corrupted contexts are identical: nothing to patch")


def pair_from_batches(clean: PromptBatch, corrupted: PromptBatch, description: str = "") -> PatchPair:
    """Validate two renderings and pick the answer/foil classes at the query."""
    check_pair(clean, corrupted)
    answer = clean.shown_labels[:, -1].clone()
    n_classes = len(clean.label_words)
    other = corrupted.shown_labels[:, -1]
    foil = torch.where(other != answer, other, (answer + 1) % n_classes)
    return PatchPair(clean, corrupted, answer, foil, description or f"{clean.condition} vs {corrupted.condition}")


def make_pair(
    task: Task,
    tokenizer: Any,
    example_ids: Int[Tensor, "batch example"],
    *,
    n_ctx: int,
    prepend_bos: bool,
    last_m: int | None = None,
    template: Template | None = None,
) -> PatchPair:
    """Correct-label (clean) vs flipped-label (corrupted) renderings of ``example_ids``.

    ``last_m`` flips only the last ``m`` demonstration labels (the query's own label
    token, after the readout slot, is left as in the clean run). Cost: tokenization only.
    """
    clean = build_prompt_batch(
        task, tokenizer, example_ids, "default", n_ctx=n_ctx, prepend_bos=prepend_bos, template=template
    )
    n_ex = clean.n_examples
    if last_m is None:
        corrupted = build_prompt_batch(
            task, tokenizer, example_ids, "flipped", n_ctx=n_ctx, prepend_bos=prepend_bos, template=template
        )
        desc = "correct labels vs all labels flipped"
    else:
        if not 1 <= last_m <= n_ex - 1:
            raise PairError(f"last_m={last_m} must be between 1 and the number of demonstrations ({n_ex - 1})")
        shown = clean.true_labels.clone()
        sl = slice(n_ex - 1 - last_m, n_ex - 1)
        shown[:, sl] = (shown[:, sl] + 1) % task.n_classes
        corrupted = build_prompt_batch(
            task,
            tokenizer,
            example_ids,
            "flipped",
            n_ctx=n_ctx,
            prepend_bos=prepend_bos,
            template=template,
            shown_labels=shown,
        )
        desc = f"correct labels vs last {last_m} demonstration labels flipped"
    return pair_from_batches(clean, corrupted, desc)


def pair_for(
    loaded: Any, task: Task, n_contexts: int, n_examples: int, seed: int = 0, last_m: int | None = None
) -> PatchPair:
    """``make_pair`` on freshly sampled contexts for a ``LoadedModel``."""
    ids = sample_contexts(task, n_contexts, n_examples, seed=seed)
    return make_pair(task, loaded.tokenizer, ids, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos, last_m=last_m)
