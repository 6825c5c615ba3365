from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from mechicl.analysis.behavior.curves import BehaviorConfig, score, summarize
from mechicl.analysis.engine.hooks import run_to_final
from mechicl.analysis.engine.readout import label_logits
from mechicl.data.prompts import build_prompt_batch
from mechicl.runs.behavior import run_behavior
from tests import helpers


def test_readout_equals_full_logits_unpadded(tiny, toy):
    b = helpers.batch(tiny, toy, n_contexts=5, n_examples=7)
    fast = label_logits(tiny.model, b, batch_size=5, progress=False)
    assert torch.allclose(fast, helpers.full_label_logits(tiny, b), atol=1e-5)


def test_padded_batches_equal_one_at_a_time(tiny):
    task = helpers.toy_task(n_classes=3)  # inputs of different lengths -> padding
    b = helpers.batch(tiny, task, n_contexts=6, n_examples=5)
    assert len(set(b.lengths.tolist())) > 1
    together = label_logits(tiny.model, b, batch_size=6, progress=False)
    alone = torch.cat([label_logits(tiny.model, b.select([i]), batch_size=1, progress=False) for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_one_forward_equals_prompting_once_per_k(tiny, toy):
    """Brute force: for each k, a prompt with k examples + the query, read at its last slot."""
    b = helpers.batch(tiny, toy, n_contexts=3, n_examples=6)
    fast = label_logits(tiny.model, b, progress=False)
    for k in range(b.n_examples):
        short = build_prompt_batch(
            toy,
            tiny.tokenizer,
            b.example_ids[:, : k + 1],
            n_ctx=tiny.n_ctx,
            prepend_bos=True,
            shown_labels=b.shown_labels[:, : k + 1],
        )
        with torch.no_grad():
            for i in range(3):
                n = int(short.lengths[i])
                logits = tiny.model(short.tokens[i : i + 1, :n])[0, short.readout_pos[i, -1]]
                assert torch.allclose(fast[i, k], logits[b.label_token_ids], atol=1e-5)


def test_final_residual_stops_before_unembed(tiny, toy):
    b = helpers.batch(tiny, toy, n_contexts=2)
    _, cache = tiny.model.run_with_cache(b.tokens)
    resid = run_to_final(tiny.model, b.tokens)
    assert torch.allclose(resid, cache["ln_final.hook_in"], atol=1e-6)


def _fake_batch(tiny, toy, condition: str):
    return helpers.batch(tiny, toy, condition, n_contexts=2, n_examples=3)


def test_score_by_hand(tiny, toy):
    b = _fake_batch(tiny, toy, "flipped")
    logits = torch.zeros(2, 3, 2)
    logits[..., 1] = math.log(3.0)  # p = (0.25, 0.75) everywhere
    raw = score(logits, b)
    acc = raw[raw.metric == "accuracy"].value.to_numpy().reshape(2, 3)
    assert np.array_equal(acc, (b.shown_labels == 1).numpy().astype(float))
    ll = raw[raw.metric == "log_likelihood"].value.to_numpy().reshape(2, 3)
    want = np.where(b.shown_labels.numpy() == 1, math.log(0.75), math.log(0.25))
    assert np.allclose(ll, want)
    ent = raw[raw.metric == "entropy"].value.to_numpy()
    assert np.allclose(ent, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    acc_true = raw[raw.metric == "accuracy_true"].value.to_numpy().reshape(2, 3)
    assert np.array_equal(acc_true, (b.true_labels == 1).numpy().astype(float))
    assert "accuracy_true" not in set(score(logits, _fake_batch(tiny, toy, "default")).metric)


def test_summarize_ci():
    raw = pd.DataFrame({"condition": "c", "context": range(4), "k": 0, "metric": "m", "value": [1.0, 2.0, 3.0, 4.0]})
    row = summarize(raw, "model", "task").iloc[0]
    assert row["mean"] == 2.5 and row.n == 4
    half = 3.182446305284263 * np.std([1, 2, 3, 4], ddof=1) / 2  # t_{0.975, 3}
    assert row.ci_low == pytest.approx(2.5 - half) and row.ci_high == pytest.approx(2.5 + half)


def test_run_behavior_shapes(tiny, toy):
    cfg = BehaviorConfig("tiny", "toy", ("default", "random", "flipped", "arbitrary:a/b"), k_max=4, n_contexts=5)
    res = run_behavior(tiny, toy, cfg, progress=False)
    s = res.summary
    assert list(s.columns) == ["model", "task", "condition", "k", "metric", "mean", "ci_low", "ci_high", "n"]
    assert set(s.condition) == {"default", "random", "flipped", "arbitrary:a/b"}
    assert set(s.k) == set(range(5)) and (s.n == 5).all()
    # k = 0 sees no labels, so every condition predicts the same distribution there
    e0 = s[(s.k == 0) & (s.metric == "entropy")]["mean"].to_numpy()
    assert np.allclose(e0[:3], e0[0])


def test_switch_conditions_score_current_and_initial_maps(tiny, toy):
    b = helpers.batch(tiny, toy, "default>flipped@2", n_contexts=2, n_examples=4)
    logits = torch.randn(2, 4, 2)
    raw = score(logits, b)
    assert {"accuracy_initial", "log_likelihood_initial", "accuracy_true"} <= set(raw.metric)
    acc = raw[raw.metric == "accuracy"].value.to_numpy().reshape(2, 4)
    acc0 = raw[raw.metric == "accuracy_initial"].value.to_numpy().reshape(2, 4)
    assert np.array_equal(acc[:, :2], acc0[:, :2])  # before the switch both maps agree
    assert np.array_equal(acc[:, 2:], 1 - acc0[:, 2:])  # after it they are complementary (binary)


def test_sequence_scoring_equals_single_token_readout(tiny, toy):
    from mechicl.analysis.engine.readout import label_sequence_logprobs

    b = helpers.batch(tiny, toy, "flipped", n_contexts=3, n_examples=5)
    seq = torch.log_softmax(label_sequence_logprobs(tiny.model, b, rows_per_forward=4, progress=False), -1)
    one = torch.log_softmax(label_logits(tiny.model, b, progress=False), -1)
    assert torch.allclose(seq, one, atol=1e-5)


def test_multi_token_labels_score_whole_sequences(tiny, toy):
    """Labels 'the red' / 'the blue' share their first token; only sequence scoring can tell them apart."""
    from mechicl.analysis.engine.readout import label_sequence_logprobs
    from mechicl.data.task import Task

    task = Task("mt", toy.texts, toy.labels, ("the red", "the blue"), toy.template)
    ids = helpers.sample_contexts(task, 2, 4, seed=0)
    b = build_prompt_batch(task, tiny.tokenizer, ids, n_ctx=512, prepend_bos=True, multi_token=True)
    tok = tiny.tokenizer.convert_tokens_to_ids
    assert b.label_token_seqs == ((tok("the"), tok("red")), (tok("the"), tok("blue")))
    rows = torch.arange(2)[:, None]
    assert (b.roles[rows, b.label_pos] == 4).all() and (b.roles[rows, b.label_pos + 1] == 4).all()
    got = label_sequence_logprobs(tiny.model, b, progress=False)
    with torch.no_grad():  # by hand: context up to example 2's label, then 'the blue'
        p = int(b.label_pos[1, 2])
        seq = torch.cat([b.tokens[1, :p], torch.tensor([tok("the"), tok("blue")])])[None]
        logp = torch.log_softmax(tiny.model(seq)[0], -1)
        want = logp[p - 1, tok("the")] + logp[p, tok("blue")]
    assert torch.allclose(got[1, 2, 1], want, atol=1e-5)
    res = run_behavior(
        tiny,
        task,
        BehaviorConfig("tiny", "mt", ("default", "flipped"), k_max=3, n_contexts=3, multi_token=True),
        progress=False,
    )
    assert set(res.summary.condition) == {"default", "flipped"}
