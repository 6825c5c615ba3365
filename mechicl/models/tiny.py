"""A tiny random model over the word-level test vocabulary (``data.words``), for fast tests and dry runs."""

from __future__ import annotations

import torch
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

from mechicl.data.words import VOCAB, tiny_tokenizer
from mechicl.models.base import LoadedModel


def tiny_config(seed: int = 0, n_layers: int = 2, n_ctx: int = 512) -> TransformerBridgeConfig:
    return TransformerBridgeConfig(
        n_layers=n_layers,
        d_model=64,
        n_heads=4,
        d_head=16,
        d_mlp=128,
        n_ctx=n_ctx,
        d_vocab=len(VOCAB),
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
    )


def load_tiny(seed: int = 0, n_layers: int = 2, n_ctx: int = 512) -> LoadedModel:
    """A random 2-layer, 4-head, d_model=64 model (~0.1 M parameters). One forward: ~ms."""
    tok = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TransformerBridge.boot_native(tiny_config(seed, n_layers, n_ctx), tokenizer=tok).eval()
    return LoadedModel("tiny", model, tok, True, f"random boot_native model (seed {seed})")
