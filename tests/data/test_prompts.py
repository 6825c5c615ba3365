from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechicl.data.conditions import LabelCondition, parse_conditions
from mechicl.data.prompts import BOS, INPUT, LABEL, PAD, build_prompt_batch, sample_contexts
from mechicl.data.task import Task, Template
from mechicl.data.words import TOY_WORDS
from mechicl.errors import ContextOverflowError, LabelTokenError, PromptError
from tests import helpers

TEMPLATE_WORDS = ["input", "review", "sentence", "text", "answer", "the", "is", "label", "class", "output"]
PUNCT = [":", "=", ">", "-", ""]
SEPS = ["\n", "\n\n", " ", " ; ", " . ", "\n---\n"]
LABEL_POOL = ["positive", "negative", "good", "bad", "red", "green", "blue", "yes", "no", "sea", "chair"]


@st.composite
def task_and_template(draw):
    n_classes = draw(st.integers(2, 4))
    words = draw(st.lists(st.sampled_from(LABEL_POOL), min_size=n_classes, max_size=n_classes, unique=True))
    n = draw(st.integers(n_classes * 3, 40))
    lens = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    texts = tuple(" ".join(TOY_WORDS[(7 * i + j) % 64] for j in range(L)) for i, L in enumerate(lens))
    labels = tuple(draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n)))
    a, b = draw(st.sampled_from(TEMPLATE_WORDS)), draw(st.sampled_from(TEMPLATE_WORDS))
    p1, p2 = draw(st.sampled_from(PUNCT)), draw(st.sampled_from(PUNCT))
    mid = draw(st.sampled_from(["\n", " ", "\n\n"]))
    tpl = Template(
        f"{a}{p1} {{input}}{mid}{b}{p2} {{label}}",
        draw(st.sampled_from(SEPS)),
        draw(st.sampled_from(["", "the following :\n"])),
    )
    return Task("prop", texts, labels, tuple(words), tpl), n_classes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    task_and_template(),
    st.sampled_from(["default", "random", "flipped", "arbitrary"]),
    st.integers(1, 6),
    st.integers(0, 10_000),
)
def test_positions_properties(tiny, tt, kind, n_examples, seed):
    task, n_classes = tt
    n_examples = min(n_examples, len(task))
    cond = (
        LabelCondition("arbitrary", tuple(["a", "b", "c", "d"][:n_classes]))
        if kind == "arbitrary"
        else LabelCondition(kind)
    )
    ids = sample_contexts(task, 3, n_examples, seed=seed)
    b = build_prompt_batch(task, tiny.tokenizer, ids, cond, n_ctx=tiny.n_ctx, prepend_bos=True, seed=seed)
    rows = torch.arange(b.n_contexts)[:, None]
    # the token after every readout slot is that example's (shown) label token
    assert torch.equal(b.tokens[rows, b.readout_pos + 1], b.label_token_ids[b.shown_labels])
    assert torch.equal(b.label_pos, b.readout_pos + 1)
    assert (b.roles[rows, b.label_pos] == LABEL).all()
    assert (b.roles[:, 0] == BOS).all()
    # spans are ordered and disjoint: input_i < label_i < input_{i+1}
    s, e = b.input_spans[..., 0], b.input_spans[..., 1]
    assert (s < e).all() and (e <= b.label_pos).all()
    assert (b.label_pos[:, :-1] < s[:, 1:]).all()
    for i in range(b.n_contexts):
        n = int(b.lengths[i])
        assert (b.roles[i, n:] == PAD).all() and (b.roles[i, :n] != PAD).all()
        for j in range(b.n_examples):
            assert (b.roles[i, s[i, j] : e[i, j]] == INPUT).all()
    # the labels shown follow the condition's definition
    if kind in ("default", "arbitrary"):
        assert torch.equal(b.shown_labels, b.true_labels)
    elif kind == "flipped":
        assert torch.equal(b.shown_labels, (b.true_labels + 1) % n_classes)
        assert (b.shown_labels != b.true_labels).all()
    assert b.label_words == cond.label_words(task)


def test_random_labels_keep_marginal(tiny):
    task = helpers.toy_task(n_classes=3, n=300)
    ids = sample_contexts(task, 200, 20, seed=1)
    b = build_prompt_batch(task, tiny.tokenizer, ids, "random", n_ctx=tiny.n_ctx, prepend_bos=True, seed=1)
    freq = np.bincount(b.shown_labels.flatten().numpy(), minlength=3) / b.shown_labels.numel()
    assert np.allclose(freq, 1 / 3, atol=0.02)
    # independent of the true label: agreement near 1/3, not 1
    assert abs((b.shown_labels == b.true_labels).float().mean().item() - 1 / 3) < 0.03
    again = build_prompt_batch(task, tiny.tokenizer, ids, "random", n_ctx=tiny.n_ctx, prepend_bos=True, seed=1)
    assert torch.equal(again.shown_labels, b.shown_labels)


def test_conditions_share_inputs(tiny, toy):
    ids = sample_contexts(toy, 5, 6, seed=3)
    bs = [
        build_prompt_batch(toy, tiny.tokenizer, ids, c, n_ctx=tiny.n_ctx, prepend_bos=True)
        for c in ("default", "flipped")
    ]
    assert torch.equal(bs[0].input_spans, bs[1].input_spans)
    assert torch.equal(bs[0].label_pos, bs[1].label_pos)
    differ = bs[0].tokens != bs[1].tokens
    assert torch.equal(differ, torch.zeros_like(differ).scatter_(1, bs[0].label_pos, True))


def test_parse_conditions():
    cs = parse_conditions("default, random,flipped,arbitrary,arbitrary:sea/chair")
    assert [c.name for c in cs] == ["default", "random", "flipped", "arbitrary:A/B", "arbitrary:sea/chair"]
    with pytest.raises(PromptError, match="unknown label condition"):
        parse_conditions("inverted")
    with pytest.raises(PromptError, match="only 'arbitrary' takes label words"):
        parse_conditions("flipped:a/b")


def test_multi_token_label_is_rejected_with_tokenization(tiny, toy):
    task = Task("t", toy.texts, toy.labels, ("very bad", "good"), toy.template)
    with pytest.raises(LabelTokenError, match=r"'very bad' is not exactly one token.*\[\d+\]"):
        helpers.batch(tiny, task)


def test_labels_sharing_a_token_are_rejected(tiny, toy):
    task = Task("t", toy.texts, toy.labels, ("zzzz", "qqqq"), toy.template)  # both <unk>
    with pytest.raises(LabelTokenError, match="share a token"):
        helpers.batch(tiny, task)


def test_arbitrary_words_must_match_class_count(tiny, toy):
    with pytest.raises(PromptError, match="gives 3 label words but task toy has 2 classes"):
        helpers.batch(tiny, toy, "arbitrary:a/b/c")


def test_overflow_raises_instead_of_truncating(tiny, toy):
    ids = sample_contexts(toy, 2, 40, seed=0)
    with pytest.raises(ContextOverflowError, match="n_ctx is 50.*Nothing is truncated"):
        build_prompt_batch(toy, tiny.tokenizer, ids, n_ctx=50, prepend_bos=True)


def test_too_many_examples_for_task(toy):
    with pytest.raises(PromptError, match="exceeds"):
        sample_contexts(toy, 1, len(toy) + 1)


def test_bad_template():
    from mechicl.errors import TaskError

    with pytest.raises(TaskError, match="end with"):
        Template("{label} then {input}")


def test_select_trims_padding(tiny, toy):
    b = helpers.batch(tiny, toy, n_contexts=6)
    sub = b.select([1, 3])
    assert sub.tokens.shape[1] == int(b.lengths[[1, 3]].max())
    assert torch.equal(sub.label_pos, b.label_pos[[1, 3]])
    assert sub.texts == (b.texts[1], b.texts[3])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(2, 5), st.sampled_from(["default", "flipped"]), st.integers(0, 9), st.booleans(), st.integers(0, 999)
)
def test_mid_context_switch_follows_its_definition(tiny, n_classes, first, at, alternate, seed):
    task = helpers.toy_task(n_classes=n_classes, n=60)
    then = "flipped" if first == "default" else "default"
    cond = LabelCondition.parse(f"{first}>{then}@{'alt' if alternate else at}")
    b = build_prompt_batch(
        task, tiny.tokenizer, sample_contexts(task, 3, 8, seed=seed), cond, n_ctx=512, prepend_bos=True
    )
    flip = (b.true_labels + 1) % n_classes
    for i in range(8):
        kind = (first if i % 2 == 0 else then) if alternate else (first if i < at else then)
        want = b.true_labels[:, i] if kind == "default" else flip[:, i]
        assert torch.equal(b.shown_labels[:, i], want)
    assert torch.equal(b.initial_labels, b.true_labels if first == "default" else flip)
    assert b.condition == cond.name


def test_switch_syntax_errors():
    with pytest.raises(PromptError, match="switch between 'default' and 'flipped'"):
        LabelCondition.parse("random>flipped@3")
    with pytest.raises(PromptError, match="@N"):
        LabelCondition.parse("default>flipped")


def test_flipped_three_classes_renders_the_next_class_word(tiny):
    """3 classes: red shows green, green shows blue, blue shows red, in the rendered text and in the tokens."""
    task = helpers.toy_task(n_classes=3, n=60)
    ids = sample_contexts(task, 6, 9, seed=2)
    b = build_prompt_batch(task, tiny.tokenizer, ids, "flipped", n_ctx=tiny.n_ctx, prepend_bos=True)
    nxt = {"red": "green", "green": "blue", "blue": "red"}
    seen = set()
    for i, text in enumerate(b.texts):
        shown = [line.removeprefix("Label: ") for line in text.split("\n") if line.startswith("Label: ")]
        true = [task.label_names[task.labels[j]] for j in ids[i].tolist()]
        assert shown == [nxt[t] for t in true]
        seen |= set(zip(true, shown))
    assert seen == set(nxt.items())  # every class's shift occurs
    rows = torch.arange(b.n_contexts)[:, None]
    assert torch.equal(b.tokens[rows, b.label_pos], b.label_token_ids[(b.true_labels + 1) % 3])
