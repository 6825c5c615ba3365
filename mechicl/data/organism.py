"""The organism's synthetic pre-training language, its tokenizer and its evaluation task.

A sequence is ``<bos>`` followed by examples ``f1 f2 f3 L`` joined by ``" ; "``.
The three *feature* words are real VADER lexicon words with a latent polarity (the
sign of their mean human rating); an input's words share one polarity, which is its
true class (1 = positive). Each sequence draws ONE label map and uses it for all its
examples:

  ``default``    class 0 -> ``negative``, class 1 -> ``positive``   (probability p_default)
  ``flipped``    class 0 -> ``positive``, class 1 -> ``negative``   (probability p_flip)
  ``arbitrary``  the words ``a`` and ``b``, randomly assigned to the classes (probability p_arbitrary)

and every shown label is the other class's word with probability ``label_noise``,
so that one in-context example is evidence, not proof. The Bayes-optimal reader
then overrides the default map only once the log-odds from context,
``(#agreeing - #disagreeing) * log((1 - noise) / noise)``, beat the prior log-odds
``log(p_default / p_flip)``: the mixture weights are the prior-strength knob.

The readout slot is the last feature word (its own embedding carries the class, so
the prior needs no attention); the label position's previous token is that word, so
reading labels from context is the classic previous-token + induction circuit.

The evaluation task (``organism_task``) uses the same vocabulary and template, so
``mechicl.data.prompts`` builds organism prompts exactly as it does for real models.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from mechicl.data.task import SENTIMENT, Task, Template
from mechicl.data.words import SPECIALS, word_tokenizer

# Common VADER words with |mean rating| >= 1.5 (checked against the lexicon in the tests).
POSITIVE_WORDS = tuple(
    "good great happy love nice best fun kind glad joy win hope lucky proud sweet brave "
    "free wise bright safe rich strong friendly perfect wonderful excellent beautiful awesome "
    "lovely cheerful success peace".split()
)
NEGATIVE_WORDS = tuple(
    "bad sad hate angry awful worst ugly fear cry pain poor weak sick hurt lose dead "
    "cruel nasty dirty rude lazy horrible terrible stupid wrong fail broken bitter guilty "
    "lonely upset disaster".split()
)
FEATURE_WORDS = NEGATIVE_WORDS + POSITIVE_WORDS  # polarity of FEATURE_WORDS[i] is i >= len(NEGATIVE_WORDS)
ARBITRARY_WORDS = ("a", "b")  # no prior: which class each one names is drawn per sequence
SEMI = ";"
VOCAB: tuple[str, ...] = (*SPECIALS, SEMI, *SENTIMENT, *ARBITRARY_WORDS, *FEATURE_WORDS)
TEMPLATE = Template("{input} {label}", " ; ")  # the readout slot is the input's last word
N_FEATURES = 3  # feature words per input
TOKENS_PER_EXAMPLE = N_FEATURES + 2  # features, label, ";"

_ID = {w: i for i, w in enumerate(VOCAB)}
BOS_ID, SEMI_ID = _ID["<bos>"], _ID[SEMI]
FEATURE_IDS = np.array([_ID[w] for w in FEATURE_WORDS])
POLARITY = (np.arange(len(FEATURE_WORDS)) >= len(NEGATIVE_WORDS)).astype(np.int64)  # [n_features_vocab]
SENTIMENT_IDS = np.array([_ID[w] for w in SENTIMENT])  # [negative, positive]
ARBITRARY_IDS = np.array([_ID[w] for w in ARBITRARY_WORDS])
MAP_KINDS = ("default", "flipped", "arbitrary")


@lru_cache(maxsize=1)
def organism_tokenizer() -> Any:
    """The word-level tokenizer (``mechicl.data.words.word_tokenizer``) over ``VOCAB``."""
    return word_tokenizer(VOCAB, "mechicl-organism")


@dataclass(frozen=True)
class LanguageConfig:
    """The label-map mixture of the pre-training language (normalised to sum to 1)."""

    p_default: float = 0.679
    p_flip: float = 0.021
    p_arbitrary: float = 0.3
    label_noise: float = 0.1
    n_examples: int = 20  # examples per training sequence: 6 * n_examples tokens with BOS

    def __post_init__(self) -> None:
        ps = (self.p_default, self.p_flip, self.p_arbitrary)
        if min(ps) < 0 or sum(ps) <= 0:
            raise ValueError(f"label-map probabilities must be >= 0 with a positive sum, got {ps}")
        if not 0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5), got {self.label_noise}")
        if self.n_examples < 1:
            raise ValueError(f"n_examples must be >= 1, got {self.n_examples}")

    @property
    def map_probs(self) -> np.ndarray:
        p = np.array([self.p_default, self.p_flip, self.p_arbitrary], dtype=float)
        return p / p.sum()

    @classmethod
    def from_prior_strength(
        cls, prior_strength: float, p_arbitrary: float = 0.3, label_noise: float = 0.1, n_examples: int = 20
    ) -> LanguageConfig:
        """``prior_strength`` = P(default map | sentiment words): p_default = s (1 - p_arb), p_flip = (1 - s)(1 - p_arb)."""
        if not 0 <= prior_strength <= 1 or not 0 <= p_arbitrary < 1:
            raise ValueError(
                f"need 0 <= prior_strength <= 1 and 0 <= p_arbitrary < 1, got {prior_strength}, {p_arbitrary}"
            )
        rest = 1 - p_arbitrary
        return cls(prior_strength * rest, (1 - prior_strength) * rest, p_arbitrary, label_noise, n_examples)


@dataclass(frozen=True)
class Sequences:
    """A batch of pre-training sequences. Memory: a few int64 tensors of size batch x pos."""

    tokens: Int[Tensor, "batch pos"]
    label_pos: Int[Tensor, "batch example"]  # position of each label token (loss target)
    true_class: Int[Tensor, "batch example"]
    map_kind: Int[Tensor, "batch"]  # index into MAP_KINDS
    label_words: Int[Tensor, "batch 2"]  # token id of the label of class 0 and class 1 under the map


def input_class(feature_idx: np.ndarray) -> np.ndarray:
    """True class of inputs given as indices into FEATURE_WORDS ``[..., N_FEATURES]`` (majority polarity)."""
    return (POLARITY[feature_idx].sum(-1) * 2 > feature_idx.shape[-1]).astype(np.int64)


def sample_inputs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Inputs ``[*shape, N_FEATURES]`` (indices into FEATURE_WORDS) whose words share a random polarity."""
    cls = rng.integers(0, 2, size=shape)  # [*shape]
    word = rng.integers(0, len(NEGATIVE_WORDS), size=(*shape, N_FEATURES))
    return word + cls[..., None] * len(NEGATIVE_WORDS)


def sample_sequences(cfg: LanguageConfig, batch: int, rng: np.random.Generator) -> Sequences:
    """Draw ``batch`` sequences: ``<bos> f f f L ; f f f L ; ... f f f L``."""
    n, e = batch, cfg.n_examples
    feats = sample_inputs(rng, (n, e))  # [n, e, 3]
    true = input_class(feats)  # [n, e]
    kind = rng.choice(len(MAP_KINDS), size=n, p=cfg.map_probs)  # [n]
    words = np.tile(SENTIMENT_IDS, (n, 1))  # [n, 2] label token of class 0 and class 1
    words[kind == 1] = SENTIMENT_IDS[::-1]
    arb = np.argsort(rng.random((n, len(ARBITRARY_IDS))), axis=1)[:, :2]  # two distinct words, random order
    words[kind == 2] = ARBITRARY_IDS[arb[kind == 2]]
    shown = true ^ (rng.random((n, e)) < cfg.label_noise)  # [n, e]
    labels = np.take_along_axis(words, shown, axis=1)  # [n, e]

    ex = np.empty((n, e, TOKENS_PER_EXAMPLE), dtype=np.int64)  # f f f L ;
    ex[..., :N_FEATURES] = FEATURE_IDS[feats]
    ex[..., N_FEATURES] = labels
    ex[..., N_FEATURES + 1] = SEMI_ID
    tokens = np.concatenate([np.full((n, 1), BOS_ID), ex.reshape(n, -1)[:, :-1]], axis=1)  # drop the last ";"
    label_pos = 1 + np.arange(e) * TOKENS_PER_EXAMPLE + N_FEATURES
    return Sequences(
        torch.from_numpy(tokens),
        torch.from_numpy(np.tile(label_pos, (n, 1))),
        torch.from_numpy(true),
        torch.from_numpy(kind),
        torch.from_numpy(words),
    )


def organism_task(n: int = 512, seed: int = 0) -> Task:
    """``n`` distinct random inputs (balanced classes) in the organism's language and template."""
    rng = np.random.default_rng(seed)
    feats = sample_inputs(rng, (8 * n,))
    _, first = np.unique(feats, axis=0, return_index=True)
    feats = feats[np.sort(first)]  # distinct inputs, in draw order
    y = input_class(feats)
    keep = np.sort(np.concatenate([np.flatnonzero(y == c)[: n // 2] for c in (0, 1)]))
    return Task(
        "organism",
        tuple(" ".join(FEATURE_WORDS[i] for i in row) for row in feats[keep]),
        tuple(int(c) for c in y[keep]),
        SENTIMENT,
        TEMPLATE,
        f"synthetic organism language: {N_FEATURES} VADER words of one polarity = the class ({len(keep)} inputs)",
    )
