"""``LoadedModel``: a hooked TransformerBridge, the tokenizer prompts are built with, and its BOS convention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoadedModel:
    """A hooked model, the tokenizer mechicl builds prompts with, and its BOS convention.

    ``prepend_bos`` follows the model's own tokenizer: True when ``tokenizer(text)``
    starts with BOS (Gemma), False when it does not (SmolLM2). ``device`` is where inputs go (the
    input embedding's device), ``dtype`` the parameters' precision, ``device_map`` the accelerate
    split ``{module: device}`` when the model spans several devices (None otherwise).
    """

    name: str
    model: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any  # a fast (offset-mapping) Hugging Face tokenizer
    prepend_bos: bool
    source: str
    device: str = "cpu"
    dtype: str = "float32"
    device_map: dict[str, Any] | None = None

    @property
    def n_ctx(self) -> int:
        return int(self.model.cfg.n_ctx)

    @property
    def is_split(self) -> bool:
        """Whether the model spans more than one device (a ``device_map`` split)."""
        return self.device_map is not None and len({str(v) for v in self.device_map.values()}) > 1
