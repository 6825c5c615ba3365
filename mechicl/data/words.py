"""Word-level tokenizers built in memory (no download): the tiny test model's and the organisms'.

Lower-cased words split on whitespace and punctuation, looked up in a fixed
vocabulary; anything else becomes ``<unk>``. Whitespace produces no tokens.
The vocabularies are data (``VOCAB`` here, ``data.organism.VOCAB``); the models
that read them live in ``mechicl.models``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

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
    # imported here, not at the top: ``transformers`` is heavy, and the task catalogue imports this
    # module's vocabularies without ever building a tokenizer (``import mechicl.data.tasks`` stays light)
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
    """The word-level tokenizer over ``VOCAB`` (the tiny test model's)."""
    return word_tokenizer(VOCAB, "mechicl-tiny")
