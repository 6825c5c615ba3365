"""Builders for tests: small models, tasks and prompt batches with known content."""

from __future__ import annotations

from functools import lru_cache

import torch

from mechicl.models import LoadedModel
from mechicl.prompts import PromptBatch, build_prompt_batch, sample_contexts
from mechicl.tasks import Task, Template, toy_task as _toy_task
from mechicl.tiny import TOY_WORDS, load_tiny


@lru_cache(maxsize=4)
def tiny_model(seed: int = 0) -> LoadedModel:
    return load_tiny(seed=seed)


def toy_task(n_classes: int = 2, n: int = 128, template: Template | None = None) -> Task:
    """Toy words with ``n_classes`` classes named by tiny-vocabulary words."""
    if n_classes == 2 and template is None:
        return _toy_task(n)
    names = ("red", "green", "blue", "left", "right", "up", "down")[:n_classes]
    texts = tuple(" ".join(TOY_WORDS[(i + 7 * j) % 64] for j in range(1 + i % 3)) for i in range(n))  # 1-3 words
    labels = tuple(i % n_classes for i in range(n))
    return Task(f"toy{n_classes}", texts, labels, names, template or Template("Input: {input}\nLabel: {label}"))


def batch(
    loaded: LoadedModel,
    task: Task,
    condition: str = "default",
    n_contexts: int = 4,
    n_examples: int = 6,
    seed: int = 0,
    template: Template | None = None,
) -> PromptBatch:
    ids = sample_contexts(task, n_contexts, n_examples, seed=seed)
    return build_prompt_batch(
        task, loaded.tokenizer, ids, condition, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos,
        template=template, seed=seed,
    )


def full_label_logits(loaded: LoadedModel, b: PromptBatch) -> torch.Tensor:
    """Reference readout: the model's full logits, one unpadded context at a time."""
    out = []
    with torch.no_grad():
        for i in range(b.n_contexts):
            n = int(b.lengths[i])
            logits = loaded.model(b.tokens[i : i + 1, :n])[0]
            out.append(logits[b.readout_pos[i]][:, b.label_token_ids])
    return torch.stack(out)
