"""A built Hugging Face model as a hooked TransformerBridge.

``bridge_hf`` boots the bridge around a built model with mechicl's one tokenizer; ``native_prepend_bos`` says whether
that tokenizer adds BOS itself."""

from __future__ import annotations

from typing import Any

from transformer_lens.model_bridge import TransformerBridge


def bridge_hf(name: str, hf: Any, tok: Any) -> Any:
    """Bridge a built HF model; its dtype (and a ``device_map`` split) are kept, cfg records them."""
    if not getattr(hf.config, "architectures", None):
        hf.config.architectures = [type(hf).__name__]
    dtype = next(p.dtype for p in hf.parameters() if p.is_floating_point())
    # TransformerLens 4.3 reloads a second copy of a tokenizer that does not say it adds BOS (0.27 GB resident on
    # gemma3-270m); mechicl places BOS itself (``LoadedModel.prepend_bos``) and never tokenizes through the bridge,
    # so the flag is shown to the bridge only while it boots, and the one tokenizer keeps its own settings.
    kwargs, side = dict(tok.init_kwargs), tok.padding_side
    tok.init_kwargs["add_bos_token"] = True
    try:
        bridge = TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tok, dtype=dtype).eval()
    finally:
        tok.init_kwargs.clear()
        tok.init_kwargs.update(kwargs)
        tok.padding_side = side
    return bridge


def native_prepend_bos(tok: Any) -> bool:
    ids = tok("a").input_ids
    return tok.bos_token_id is not None and len(ids) > 0 and ids[0] == tok.bos_token_id
