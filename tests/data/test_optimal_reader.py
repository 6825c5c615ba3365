"""The Bayes-optimal predictive of the organisms' language: closed forms, and Monte-Carlo from the generator."""

from __future__ import annotations

import numpy as np
import pytest

from mechicl.data.optimal_reader import WORDS, bayes_curve, bayes_point, posterior, predictive
from mechicl.data.organism import ARBITRARY_IDS, SENTIMENT_IDS, LanguageConfig, sample_sequences

CFG = LanguageConfig()  # the strong organism's language: 0.679 / 0.021 / 0.3, noise 0.1
WORD_IDS = np.concatenate([SENTIMENT_IDS, ARBITRARY_IDS])  # token id of WORDS[i]


def test_closed_forms():
    e, (pd_, pf, _) = CFG.label_noise, CFG.map_probs
    for k in (0, 1, 4, 16):
        d = pd_ * (1 - e) ** k * (1 - e) + pf * e**k * e
        assert bayes_point(CFG, "default", k)[0] == pytest.approx(d / (pd_ * (1 - e) ** k + pf * e**k), rel=1e-12)
        f = pf * (1 - e) ** (k + 1) + pd_ * e ** (k + 1)
        assert bayes_point(CFG, "flipped", k)[0] == pytest.approx(f / (pf * (1 - e) ** k + pd_ * e**k), rel=1e-12)
        a = ((1 - e) ** (k + 1) + e ** (k + 1)) / ((1 - e) ** k + e**k)
        assert bayes_point(CFG, "arbitrary:a/b", k)[0] == pytest.approx(a, rel=1e-12)
        assert bayes_point(CFG, "random", k) == pytest.approx((0.5, 0.5))
    # the prior log-odds log(0.679/0.021) = 3.48 need 2 agreeing flipped labels at log(9) = 2.20 each
    assert [bayes_point(CFG, "flipped", k)[1] for k in range(4)] == [0.0, 0.0, 1.0, 1.0]
    assert bayes_point(CFG, "arbitrary:a/b", 0)[1] == 0.5 and bayes_point(CFG, "arbitrary:b/a", 1)[1] == 1.0
    assert bayes_point(CFG, "default>flipped@2", 2)[1] == 0.0 and bayes_point(CFG, "default>flipped@2", 7)[1] == 1.0


def test_posterior_is_normalised_and_rejects_impossible_contexts():
    words = np.array([[0, 1, 0], [2, 3, 2]])
    post = posterior(CFG, words, np.array([[0, 1, 0], [0, 1, 0]]))
    assert np.allclose(post.sum(-1), 1) and post[0, 2:].sum() == 0 and post[1, :2].sum() == 0
    p = predictive(CFG, words, np.array([[0, 1, 0], [0, 1, 0]]), np.array([1, 1]))
    assert np.allclose(p.sum(-1), 1)
    with pytest.raises(ValueError, match="probability 0"):
        posterior(CFG, np.array([[0, 2]]), np.array([[0, 0]]))
    with pytest.raises(ValueError, match="no Bayes curve"):
        bayes_point(CFG, "shuffled", 2)
    df = bayes_curve(CFG, ("default", "flipped"), (0, 2))
    assert list(df.columns) == ["condition", "k", "p_target", "accuracy"] and len(df) == 4


def _monte_carlo(gen: LanguageConfig, reader: LanguageConfig, k: int, n: int, seed: int):
    """Sequences from the language generator (``gen``): per sequence the predictive (``reader``'s language) of
    example k's shown word from the first k examples, and the word actually shown."""
    s = sample_sequences(LanguageConfig(*gen.map_probs, gen.label_noise, k + 1), n, np.random.default_rng(seed))
    shown = s.tokens[np.arange(n)[:, None], s.label_pos].numpy()  # token ids [n, k + 1]
    words = np.argsort(WORD_IDS)[np.searchsorted(np.sort(WORD_IDS), shown)]  # index into WORDS
    classes = s.true_class.numpy()
    return predictive(reader, words[:, :k], classes[:, :k], classes[:, k]), words[:, k]


def _z_scores(pred, seen, min_group=500):
    """Group sequences by their exact predictive: |frequency - predicted| / standard error per group and word."""
    keys, inv = np.unique(np.round(pred, 12), axis=0, return_inverse=True)
    out, covered = [], 0
    for g, q in enumerate(keys):
        members = inv.reshape(-1) == g
        m = int(members.sum())
        if m >= min_group:
            freq = np.bincount(seen[members], minlength=len(WORDS)) / m
            out.append(np.abs(freq - q) / np.sqrt(np.maximum(q * (1 - q), 1e-12) / m))
            covered += m
    return np.array(out), covered


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_predictive_matches_sampling_from_the_generator(k):
    z, covered = _z_scores(*_monte_carlo(CFG, CFG, k, 200_000, seed=k))
    assert z.max() <= 4.5 and covered > 0.9 * 200_000


def test_sampling_check_detects_a_wrong_noise_level():
    z, _ = _z_scores(*_monte_carlo(LanguageConfig(0.679, 0.021, 0.3, 0.2), CFG, 2, 200_000, seed=9))
    assert z.max() > 20
