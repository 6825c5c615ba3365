"""A tiny random model and word-level tokenizer, for fast tests and dry runs.

The tokenizer is built in memory (no download): lower-cased words split on
whitespace and punctuation, looked up in a fixed vocabulary written here;
anything else becomes ``<unk>``. Whitespace produces no tokens.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

SPECIALS = ("<pad>", "<bos>", "<unk>")
_WORDS = """
: , . ! ? ' - ( ) = > / ; "
input word review sentence text sentiment label answer class topic output query example
the a an is was it this that and or not of to in on for with
positive negative neutral good bad great awful yes no true false
foo bar sea chair green blue red left right up down one two zero
following means ignore all prior knowledge flip meaning answers instead
""".split()
_LETTERS = list("abcdefghijklmnopqrstuvwxyz")
TOY_WORDS = tuple(f"w{i}" for i in range(64))
VOCAB: tuple[str, ...] = tuple(dict.fromkeys([*SPECIALS, *_WORDS, *_LETTERS, *TOY_WORDS]))


def word_tokenizer(vocab: tuple[str, ...], name: str) -> Any:
    """A fast in-memory word-level tokenizer over ``vocab`` (which starts with ``SPECIALS``).

    Lower-cased words split on whitespace and punctuation; anything else becomes ``<unk>``.
    BOS is id 1 and is prepended by callers. Shared by the tiny model and the organisms.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab[: len(SPECIALS)] != SPECIALS:
        raise ValueError(f"a word vocabulary must start with {SPECIALS}")
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<pad>",
        pad_token="<pad>",
        unk_token="<unk>",
        name_or_path=name,
        add_bos_token=True,  # tells TransformerLens not to re-download a BOS-adding tokenizer
    )


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    """The word-level tokenizer over ``VOCAB``."""
    return word_tokenizer(VOCAB, "mechicl-tiny")


def tiny_config(seed: int = 0, n_layers: int = 2, n_ctx: int = 512) -> Any:
    from transformer_lens.config import TransformerBridgeConfig

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


def load_tiny(seed: int = 0, n_layers: int = 2, n_ctx: int = 512) -> Any:
    """A random 2-layer, 4-head, d_model=64 model (~0.1 M parameters). One forward: ~ms."""
    from transformer_lens.model_bridge import TransformerBridge

    from mechicl.models import LoadedModel

    tok = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TransformerBridge.boot_native(tiny_config(seed, n_layers, n_ctx), tokenizer=tok).eval()
    return LoadedModel("tiny", model, tok, True, f"random boot_native model (seed {seed})")
