"""``LoadedModel``: a hooked TransformerBridge, the tokenizer prompts are built with, and its BOS convention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoadedModel:
    """A hooked model, the tokenizer mechicl builds prompts with, and its BOS convention.

    ``prepend_bos`` follows the model's own tokenizer: True when ``tokenizer(text)``
    starts with BOS (Gemma), False when it does not (SmolLM2).
    """

    name: str
    model: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any  # a fast (offset-mapping) Hugging Face tokenizer
    prepend_bos: bool
    source: str

    @property
    def n_ctx(self) -> int:
        return int(self.model.cfg.n_ctx)
