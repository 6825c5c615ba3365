"""The model organisms: language, deterministic training, checkpoints, and ground truth measured on the shipped ones."""

from __future__ import annotations

import re
from importlib import resources

import numpy as np
import pandas as pd
import pytest
import torch

from mechicl.models import known_models, load_model
from mechicl.organism import CHECKPOINT_DIR, ORGANISMS, checkpoint_path
from mechicl.organism.card import head_ablation, measure_curves
from mechicl.organism.language import (
    ARBITRARY_IDS,
    FEATURE_WORDS,
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    SENTIMENT_IDS,
    LanguageConfig,
    organism_task,
    organism_tokenizer,
    sample_sequences,
)
from mechicl.organism.train import OrganismConfig, load_checkpoint, save_checkpoint, train, weights_sha256
from mechicl.prompts import build_prompt_batch, sample_contexts
from mechicl.tasks import known_tasks, load_task

TINY_RECIPE = dict(steps=3, batch=4, warmup=1)


# ------------------------------------------------------------- language ---


def test_feature_words_are_vader_words_of_their_polarity():
    lex = resources.files("vaderSentiment").joinpath("vader_lexicon.txt").read_text(encoding="utf-8")
    rating = {p[0]: float(p[1]) for p in (line.split("\t") for line in lex.splitlines()) if len(p) >= 2}
    assert all(rating[w] >= 1.5 for w in POSITIVE_WORDS) and all(rating[w] <= -1.5 for w in NEGATIVE_WORDS)
    assert len(set(FEATURE_WORDS)) == len(FEATURE_WORDS)
    tok = organism_tokenizer()
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in FEATURE_WORDS)
    assert tok.unk_token_id not in tok(" ".join(FEATURE_WORDS), add_special_tokens=False).input_ids


def test_label_maps_and_noise_follow_the_recipe():
    rng = np.random.default_rng(0)
    d = sample_sequences(LanguageConfig(1, 0, 0, label_noise=0.0), 64, rng)
    f = sample_sequences(LanguageConfig(0, 1, 0, label_noise=0.0), 64, rng)
    a = sample_sequences(LanguageConfig(0, 0, 1, label_noise=0.0), 64, rng)
    shown = lambda s: s.tokens.gather(1, s.label_pos)  # noqa: E731
    assert torch.equal(shown(d), torch.as_tensor(SENTIMENT_IDS)[d.true_class])
    assert torch.equal(shown(f), torch.as_tensor(SENTIMENT_IDS)[1 - f.true_class])
    assert torch.isin(shown(a), torch.as_tensor(ARBITRARY_IDS)).all()
    assert torch.equal(shown(a), a.label_words.gather(1, a.true_class))  # one bijective map per sequence
    assert (a.label_words[:, 0] != a.label_words[:, 1]).all()
    noisy = sample_sequences(LanguageConfig(1, 0, 0, label_noise=0.3), 512, rng)
    wrong = (shown(noisy) != torch.as_tensor(SENTIMENT_IDS)[noisy.true_class]).double().mean()
    assert abs(float(wrong) - 0.3) < 0.02
    kinds = sample_sequences(LanguageConfig.from_prior_strength(0.75, 0.2), 4000, rng).map_kind
    assert np.allclose(np.bincount(kinds.numpy(), minlength=3) / 4000, [0.6, 0.2, 0.2], atol=0.025)


def test_bad_recipes_are_rejected():
    with pytest.raises(ValueError, match="prior_strength"):
        LanguageConfig.from_prior_strength(1.5)
    with pytest.raises(ValueError, match="label_noise"):
        LanguageConfig(label_noise=0.5)
    with pytest.raises(ValueError, match="n_ctx"):
        OrganismConfig(language=LanguageConfig(n_examples=40))


def test_prompt_batches_render_the_training_language():
    """mechicl's PromptBatch of the organism task has exactly the token layout the organism was trained on."""
    task = load_task("organism")
    assert "organism" in known_tasks() and task.class_counts()[0] == task.class_counts()[1]
    tok = organism_tokenizer()
    b = build_prompt_batch(task, tok, sample_contexts(task, 4, 17), "flipped", n_ctx=128, prepend_bos=True)
    seq = sample_sequences(LanguageConfig(n_examples=17), 4, np.random.default_rng(0))
    assert torch.equal(b.label_pos, seq.label_pos)
    assert b.tokens.shape == seq.tokens.shape
    not_words = lambda t: t.masked_fill(t >= int(SENTIMENT_IDS.min()), -1)  # noqa: E731  separators / BOS only
    assert torch.equal(not_words(b.tokens), not_words(seq.tokens))
    assert torch.equal(b.tokens.gather(1, b.label_pos), b.label_token_ids[b.shown_labels])


# -------------------------------------------------------------- training ---


def test_training_is_deterministic_and_seeded():
    cfg = OrganismConfig(**TINY_RECIPE)
    h1, h2 = weights_sha256(train(cfg, progress=False).model), weights_sha256(train(cfg, progress=False).model)
    h3 = weights_sha256(train(OrganismConfig(**TINY_RECIPE, seed=1), progress=False).model)
    assert h1 == h2 and h1 != h3


def test_checkpoint_round_trip(tmp_path):
    cfg = OrganismConfig(**TINY_RECIPE)
    res = train(cfg, progress=False)
    path = save_checkpoint(res.model, cfg, tmp_path / "o.safetensors")
    loaded = load_model(str(path))
    assert loaded.prepend_bos and loaded.n_ctx == cfg.n_ctx and weights_sha256(loaded.model) == weights_sha256(res.model)
    x = torch.randint(0, 50, (2, 20))
    assert torch.equal(loaded.model(x), res.model(x))
    with pytest.raises(Exception, match="not an organism checkpoint"):
        import safetensors.torch as st

        st.save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        load_checkpoint(tmp_path / "other.safetensors")


# ------------------------------------------------------ shipped organisms ---


@pytest.fixture(scope="module")
def organisms():
    return {name: load_model(name) for name in ORGANISMS}


@pytest.fixture(scope="module")
def curves(organisms) -> dict[str, pd.DataFrame]:
    return {name: measure_curves(m, n_contexts=64) for name, m in organisms.items()}


def _acc(df: pd.DataFrame, cond: str, k: int) -> pd.Series:
    return df[(df.condition == cond) & (df.k == k)].iloc[0]


def test_shipped_checkpoints_are_small_with_cards_that_match_the_weights(organisms):
    assert set(ORGANISMS) <= set(known_models())
    for name, loaded in organisms.items():
        path = checkpoint_path(name)
        assert path.stat().st_size < 2_000_000
        card = path.with_suffix(".md").read_text()
        sha = re.search(r"weights sha256: `([0-9a-f]{64})`", card).group(1)
        assert sha == weights_sha256(loaded.model), f"{name}: the model card describes other weights"
        assert "| flipped |" in card and "| default |" in card
    assert sorted(p.name for p in CHECKPOINT_DIR.glob("*.safetensors")) == ["strong.safetensors", "weak.safetensors"]


def test_strong_prior_knows_the_default_labels_zero_shot(curves):
    assert _acc(curves["organism-strong"], "default", 0)["mean"] >= 0.95


def test_flipped_labels_are_learned_from_context_faster_with_a_weak_prior(curves):
    ks = sorted(curves["organism-weak"].k.unique())
    for name, df in curves.items():
        lo0, hi16 = _acc(df, "flipped", 0), _acc(df, "flipped", 16)
        assert hi16["ci_low"] > lo0["ci_high"], f"{name}: flipped-label accuracy does not rise with k"
    weak, strong = curves["organism-weak"], curves["organism-strong"]
    crossed = [k for k in ks if _acc(weak, "flipped", k)["mean"] >= 0.9]
    assert crossed and crossed[0] <= 4, f"weak organism first reaches 0.9 at k={crossed[:1]}"
    # the strong prior resists: strictly below the weak organism, with disjoint intervals, early on
    early = [k for k in ks if 1 <= k <= 4]
    assert all(_acc(strong, "flipped", k)["mean"] < _acc(weak, "flipped", k)["mean"] for k in early)
    assert any(_acc(strong, "flipped", k)["ci_high"] < _acc(weak, "flipped", k)["ci_low"] for k in early)


def test_arbitrary_labels_are_learned_from_context(curves):
    for name, df in curves.items():
        k0, k16 = _acc(df, "arbitrary:a/b", 0), _acc(df, "arbitrary:a/b", 16)
        assert k0["ci_low"] < 0.5 + 0.15 and k16["ci_low"] > 0.75, name  # no prior for a/b; context teaches it


# ------------------------------------------------------------- mechanism ---


def test_readout_attention_heads_carry_flipped_label_icl_and_not_the_prior(organisms):
    """Mean-ablating head outputs at the readout slots (strong organism): one layer's heads together collapse
    flipped-label ICL and leave zero-shot accuracy intact. No single head does it, and random same-size sets
    that share most of those heads do it too (measured: docs/organism.md), so no random-head contrast is asserted."""
    loaded = organisms["organism-strong"]
    L, H = loaded.model.cfg.n_layers, loaded.model.cfg.n_heads
    layers = [[(l, h) for h in range(H)] for l in range(L)]
    table, base = head_ablation(loaded, n_contexts=32, seed=1, sets=layers)
    assert base["acc_correct"] - base["acc_flipped"] > 0.5  # with >= 4 demonstrations it follows flipped labels
    found = table.gap_reduction.idxmax()
    assert table.gap_reduction[found] > 0.9, table
    assert table.zero_shot_acc[found] >= base["zero_shot_acc"] - 0.05, table


# ------------------------------------------------------------------- CLI ---


def test_cli_trains_an_organism_and_behaviour_runs_on_a_shipped_one(tmp_path, capsys):
    from mechicl.cli import main

    out = tmp_path / "o.safetensors"
    assert main(["organism", "train", "--prior-strength", "0.9", "--steps", "2", "--out", str(out)]) == 0
    assert out.exists() and "p_default" in out.with_suffix(".md").read_text()
    assert main(["organism", "train", "--prior-strength", "2"]) == 2
    assert "prior_strength" in capsys.readouterr().err
    run = tmp_path / "beh"
    assert main(["behavior", "--model", "organism-strong", "--task", "organism", "--k-max", "4", "--n-contexts", "8",
                 "--conditions", "default,flipped", "--out", str(run)]) == 0
    assert any(run.iterdir())
