"""The model organisms: language, deterministic training, checkpoints, and ground truth measured on the shipped ones."""

from __future__ import annotations

import re
from importlib import resources

import numpy as np
import pandas as pd
import pytest
import torch

from mechicl.data.organism import (
    ARBITRARY_IDS,
    FEATURE_WORDS,
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    SENTIMENT_IDS,
    LanguageConfig,
    organism_tokenizer,
    sample_sequences,
)
from mechicl.data.prompts import build_prompt_batch, sample_contexts
from mechicl.data.tasks import known_tasks, load_task
from mechicl.models.loading import known_models, load_model
from mechicl.models.organism import (
    CHECKPOINT_DIR,
    OrganismConfig,
    checkpoint_path,
    live_heads,
    load_checkpoint,
    organism_config,
    save_checkpoint,
    weights_sha256,
)
from mechicl.models.registry import ORGANISMS
from mechicl.runs.heads import find_heads_for, preset_config
from mechicl.runs.organism import measure_curves, train

TINY_RECIPE = dict(steps=3, batch=4, warmup=1, prune_steps=2)


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


def test_pruning_without_a_gap_says_the_kept_head_was_not_chosen():
    """3 training steps learn no flipped-label gap: every score is NaN and the tie rule must not pass silently."""
    with pytest.warns(UserWarning, match="not chosen by effect"):
        res = train(OrganismConfig(**TINY_RECIPE), progress=False)
    assert np.isnan(res.gap_before_pruning).all() and res.kept_heads == (0,)


def test_checkpoint_round_trip(tmp_path):
    cfg = OrganismConfig(**TINY_RECIPE)
    res = train(cfg, progress=False)
    path = save_checkpoint(res.model, cfg, tmp_path / "o.safetensors")
    loaded = load_model(str(path))
    assert len(res.kept_heads) == 1 and live_heads(loaded.model, cfg.n_layers - 1) == list(res.kept_heads)
    assert (
        loaded.prepend_bos and loaded.n_ctx == cfg.n_ctx and weights_sha256(loaded.model) == weights_sha256(res.model)
    )
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
    """The two priors (the strong recipe's other seeds and unpruned variant: tests/analysis/heads/test_ground_truth.py)."""
    return {name: measure_curves(organisms[name], n_contexts=64) for name in ("organism-strong", "organism-weak")}


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
    assert sorted(p.name for p in CHECKPOINT_DIR.glob("*.safetensors")) == sorted(
        f"{s}.safetensors" for s in ORGANISMS.values()
    )


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


def test_heads_finds_the_planted_label_reading_head(organisms):
    """`mechicl heads` at its defaults (one held-out findings cell, mean ablation) on the strong organism: the head
    training kept in the last layer (read from the weights, not hard-coded) is confirmed first and validated
    above its matched controls, closing most of the correct-vs-flipped gap. Resample ablation misses it
    (tests/analysis/heads/test_ground_truth.py); mean and zero ablation find it (docs/findings.md)."""
    loaded = organisms["organism-strong"]
    res = find_heads_for(loaded, load_task("organism"), preset_config(), progress=False)
    assert res.baseline["gap_ci_low"] > 0.2, res.baseline  # with 16 flipped demonstrations it mostly follows them
    last = loaded.model.cfg.n_layers - 1
    planted = [f"L{last}H{h}" for h in live_heads(loaded.model, last)]
    assert res.confirm.heads[0] in planted, res.confirm
    top = res.validate.iloc[0]
    assert top.heads in planted and bool(top.above_control), res.validate
    assert top.effect_ci_low > 0.5 and top.diff_ci_low > 0.3, res.validate  # most of the gap, far above controls
    assert res.validate.effect.iloc[1:].max() < top.effect_ci_low  # every other validated head does less


def test_the_label_reading_head_attends_to_label_tokens(organisms):
    """Attention analysis on the organism: the planted last-layer head reads label tokens (most of its
    readout-slot attention) under flipped labels, more than the average head does."""
    from mechicl.analysis.inside.attention import label_attention

    loaded = organisms["organism-strong"]
    task = load_task("organism")
    ids = sample_contexts(task, 32, 17, seed=3)
    batch = build_prompt_batch(task, loaded.tokenizer, ids, "flipped", n_ctx=loaded.n_ctx, prepend_bos=True)
    mass = label_attention(loaded.model, [batch], 2, k_min=4, progress=False).label_mass("flipped")
    mass = mass.set_index(["layer", "head"]).label_attention
    last = loaded.model.cfg.n_layers - 1
    (h,) = live_heads(loaded.model, last)
    assert mass[(last, h)] >= 0.5 and mass[(last, h)] > mass.mean(), mass


def test_pruned_heads_write_nothing(organisms):
    for name, loaded in organisms.items():
        last = loaded.model.cfg.n_layers - 1
        kept = organism_config(name).keep_heads or loaded.model.cfg.n_heads  # 0: no pruning stage (unpruned)
        assert len(live_heads(loaded.model, last)) == kept, name  # the pruned recipes keep one last-layer head
        assert len(live_heads(loaded.model, 0)) == loaded.model.cfg.n_heads


# ------------------------------------------------------------------- CLI ---


def test_cli_trains_an_organism_and_behaviour_runs_on_a_shipped_one(tmp_path, capsys):
    from mechicl.cli import main

    out = tmp_path / "o.safetensors"
    assert (
        main(["organism", "train", "--prior-strength", "0.9", "--steps", "2", "--prune-steps", "2", "--out", str(out)])
        == 0
    )
    assert (
        out.exists()
        and "p_default" in out.with_suffix(".md").read_text()
        and "pruning stage" in out.with_suffix(".md").read_text()
    )
    assert main(["organism", "train", "--prior-strength", "2"]) == 2
    assert "prior_strength" in capsys.readouterr().err
    run = tmp_path / "beh"
    assert (
        main(
            [
                "behavior",
                "--model",
                "organism-strong",
                "--task",
                "organism",
                "--k",
                "4",
                "--n-contexts",
                "8",
                "--conditions",
                "default,flipped",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    assert any(run.iterdir())
