"""The Bayes-optimal reader of the organisms' language: exact posterior predictive of the next label.

The language (``data.organism``) draws one label map per sequence from four hypotheses,

  ``default``  class 0 -> negative, 1 -> positive            prior p_default
  ``flipped``  class 0 -> positive, 1 -> negative            prior p_flip
  ``a/b``      class 0 -> a, 1 -> b                          prior p_arbitrary / 2
  ``b/a``      class 0 -> b, 1 -> a                          prior p_arbitrary / 2

and shows each example's label under the map, or the other class's word with probability
``label_noise`` (ε). An input's class is known from its words, so after k examples with
classes ``c_i`` and shown words ``w_i`` the posterior of map ``H`` is

  P(H | ctx) ∝ prior(H) · Π_i [ (1-ε) if w_i = H(c_i);  ε if w_i = H(1-c_i);  0 otherwise ]

and the predictive of the query's word ``w`` (class ``c``) is
``Σ_H P(H | ctx) [(1-ε) 1{w = H(c)} + ε 1{w = H(1-c)}]``. Everything is exact (log space).

``bayes_curve`` evaluates it for the evaluation conditions of ``mechicl behavior`` (the
context's labels follow the condition with no noise): ``default``, ``flipped``, ``random``
(exact expectation over the binomial number of default-consistent labels), ``arbitrary:X/Y``
and mid-context switches ``default>flipped@m`` / ``@alt``. ``accuracy`` is the Bayes decision
between the condition's two label words (0.5 on a tie), as the model's readout compares them.
Cost: O(contexts x k) numpy; no model.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from jaxtyping import Float, Int

from mechicl.data.organism import ARBITRARY_WORDS, LanguageConfig
from mechicl.data.task import SENTIMENT

WORDS = (*SENTIMENT, *ARBITRARY_WORDS)  # label words, indexed 0..3: negative, positive, a, b
HYPOTHESES = ("default", "flipped", "a/b", "b/a")
MAPS = np.array([[0, 1], [1, 0], [2, 3], [3, 2]])  # MAPS[h, class] = index into WORDS


def prior(cfg: LanguageConfig) -> Float[np.ndarray, "4"]:
    """Prior over ``HYPOTHESES`` (the arbitrary mass split evenly between a/b and b/a)."""
    p_d, p_f, p_a = cfg.map_probs
    return np.array([p_d, p_f, p_a / 2, p_a / 2])


def _log_lik(words: Int[np.ndarray, "n k"], classes: Int[np.ndarray, "n k"], eps: float) -> Float[np.ndarray, "n 4"]:
    """log P(shown words | classes, H) for every hypothesis."""
    right = MAPS[:, classes] == words[None]  # [4, n, k]
    wrong = MAPS[:, 1 - classes] == words[None]
    with np.errstate(divide="ignore"):
        per = np.where(right, math.log1p(-eps), np.where(wrong, np.log(eps) if eps > 0 else -np.inf, -np.inf))
    return per.sum(-1).T  # [n, 4]


def posterior(
    cfg: LanguageConfig, words: Int[np.ndarray, "n k"], classes: Int[np.ndarray, "n k"]
) -> Float[np.ndarray, "n 4"]:
    """P(H | context) for each context; raises if a context is impossible under the language."""
    with np.errstate(divide="ignore"):
        lp = np.log(prior(cfg))[None] + _log_lik(np.asarray(words), np.asarray(classes), cfg.label_noise)
    top = lp.max(-1, keepdims=True)
    if not np.isfinite(top).all():
        raise ValueError("a context has probability 0 under this language (e.g. a word no map uses, or noise 0)")
    w = np.exp(lp - top)
    return w / w.sum(-1, keepdims=True)


def predictive(
    cfg: LanguageConfig,
    words: Int[np.ndarray, "n k"],
    classes: Int[np.ndarray, "n k"],
    query_class: Int[np.ndarray, "n"],
) -> Float[np.ndarray, "n 4"]:
    """P(the query's shown word = each of ``WORDS`` | context, query class): the Bayes-optimal prediction."""
    post = posterior(cfg, words, classes)  # [n, 4]
    eps, qc = cfg.label_noise, np.asarray(query_class)
    out = np.zeros((len(qc), len(WORDS)))
    rows = np.arange(len(qc))
    for h in range(len(HYPOTHESES)):
        np.add.at(out, (rows, MAPS[h, qc]), post[:, h] * (1 - eps))
        np.add.at(out, (rows, MAPS[h, 1 - qc]), post[:, h] * eps)
    return out


def _condition_maps(condition: str, n_examples: int) -> tuple[list[int], tuple[int, int]]:
    """For a deterministic condition: the map (index into ``MAPS``) of each example, and the two label words
    the readout compares (indices into ``WORDS``)."""
    if condition.startswith("arbitrary:"):
        pair = tuple(WORDS.index(w) for w in condition.split(":", 1)[1].split("/"))
        if sorted(pair) != [2, 3]:
            raise ValueError(f"the organisms' arbitrary words are {ARBITRARY_WORDS}; got condition {condition!r}")
        return [2 if pair == (2, 3) else 3] * n_examples, (2, 3)
    if condition in ("default", "flipped"):
        return [HYPOTHESES.index(condition)] * n_examples, (0, 1)
    if condition.startswith(("default>flipped@", "flipped>default@")):
        first, rest = condition.split(">")
        then, at = rest.split("@")
        a, b = HYPOTHESES.index(first), HYPOTHESES.index(then)
        maps = [a if (i % 2 == 0 if at == "alt" else i < int(at)) else b for i in range(n_examples)]
        return maps, (0, 1)
    raise ValueError(
        f"no Bayes curve for condition {condition!r}; use default, flipped, random, arbitrary:a/b or default>flipped@m"
    )


def _two_way(
    p: Float[np.ndarray, "n 4"], target: Int[np.ndarray, "n"], other: Int[np.ndarray, "n"]
) -> tuple[np.ndarray, np.ndarray]:
    """(P(target) among {target, other}, Bayes decision: 1 / 0.5 on a tie / 0)."""
    rows = np.arange(len(p))
    pt, po = p[rows, target], p[rows, other]
    return pt / (pt + po), np.where(np.isclose(pt, po, rtol=1e-12, atol=1e-15), 0.5, (pt > po).astype(float))


def bayes_point(cfg: LanguageConfig, condition: str, k: int) -> tuple[float, float]:
    """(P(the condition's query label), Bayes-decision accuracy) after ``k`` examples shown under ``condition``.

    The probability is renormalised over the condition's two label words (the readout compares
    those two, so the arbitrary maps' mass at k = 0 does not count against ``default``).

    The likelihoods depend on the classes only through agreement with each map, so class 0
    throughout is without loss of generality. ``random``: exact binomial expectation.
    """
    if condition == "random":  # each label default-consistent with probability 1/2; the query's label too
        j = np.arange(k + 1)
        weights = np.array([math.comb(k, int(x)) for x in j]) / 2.0**k
        words = (np.arange(k)[None] >= j[:, None]).astype(int)  # j "negative" (default for class 0), then "positive"
        p = predictive(cfg, words, np.zeros_like(words), np.zeros(k + 1, dtype=int))
        both = [_two_way(p, np.full(k + 1, t), np.full(k + 1, 1 - t)) for t in (0, 1)]
        return (float(weights @ (both[0][0] + both[1][0]) / 2), float(weights @ (both[0][1] + both[1][1]) / 2))
    maps, (u, v) = _condition_maps(condition, k + 1)
    words = np.array([[MAPS[m, 0] for m in maps[:k]]], dtype=int).reshape(1, k)
    p = predictive(cfg, words, np.zeros((1, k), dtype=int), np.zeros(1, dtype=int))
    target = MAPS[maps[k], 0]
    other = v if target == u else u
    pt, acc = _two_way(p, np.array([target]), np.array([other]))
    return float(pt[0]), float(acc[0])


def bayes_curve(cfg: LanguageConfig, conditions: tuple[str, ...], ks: tuple[int, ...]) -> pd.DataFrame:
    """Tidy (condition, k, p_target, accuracy) of the Bayes-optimal reader."""
    rows = [
        dict(condition=c, k=k, p_target=pt, accuracy=acc)
        for c in conditions
        for k in ks
        for pt, acc in [bayes_point(cfg, c, k)]
    ]
    return pd.DataFrame(rows)


def evidence_flip_scale(cfg: LanguageConfig, k: int) -> float:
    """The factor ``a`` on the weight of ``k`` flipped labels at which the Bayes-optimal reader starts to side with
    them: after ``k`` flipped (sentiment) labels only the default and flipped maps remain, with posterior log-odds
    ``log(p_flip / p_default) + a k log((1 - eps) / eps)``, zero at ``a = log(p_default / p_flip) / (k log((1 - eps)
    / eps))``. ``a < 1``: the real reader (``a = 1``) already follows the labels at this ``k``. The reference beside
    a dose-response curve (``analysis.prior.dose``), whose dose scales a head set's label signal instead."""
    p_d, p_f, _ = cfg.map_probs
    eps = cfg.label_noise
    if k < 1 or not 0 < eps < 0.5 or p_f <= 0:
        raise ValueError(f"needs k >= 1, 0 < label_noise < 0.5 and p_flip > 0; got k={k}, eps={eps}, p_flip={p_f}")
    return float(math.log(p_d / p_f) / (k * math.log((1 - eps) / eps)))
