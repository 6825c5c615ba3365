from __future__ import annotations

import json
import warnings
from collections import defaultdict
from importlib import resources

import numpy as np
import pytest
import torch

from mechicl.data.prompts import build_prompt_batch, label_token_ids
from mechicl.data.task import check_tokenization
from mechicl.data.tasks import CAR_ORIGINS, TaskWarning, cars_json, load_task
from mechicl.data.words import tiny_tokenizer
from mechicl.errors import PromptError, TaskError


def test_vader_words_follow_the_lexicon():
    task = load_task("vader-words")
    lex = {}
    for line in resources.files("vaderSentiment").joinpath("vader_lexicon.txt").read_text().splitlines():
        word, rating = line.split("\t")[:2]
        lex[word] = float(rating)
    assert len(task) > 1000 and len(set(task.texts)) == len(task)
    assert task.class_counts()[0] == task.class_counts()[1]
    for text, y in zip(task.texts, task.labels):
        assert abs(lex[text]) >= 1.5
        assert y == int(lex[text] > 0)
    assert task.label_names == ("negative", "positive")


def test_vader_words_balance_is_seeded():
    assert load_task("vader-words", seed=0).texts == load_task("vader-words", seed=0).texts


@pytest.mark.parametrize("name", ["vader-movies", "vader-tweets", "vader-nyt", "vader-amazon"])
def test_vader_sentences(name):
    task = load_task(name)
    assert len(task) > 500
    counts = task.class_counts()
    assert counts[0] == counts[1]
    assert all(t and "\t" not in t for t in task.texts)


def test_movies_size():
    # 10,605 rated movie sentences; about half survive |rating| >= 1 and balancing
    assert 3000 < len(load_task("vader-movies")) < 10605


def test_csv_and_jsonl(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\ngreat film,pos\nawful film,neg\nfine,pos\n")
    t = load_task(str(tmp_path / "d.csv"), balance=False)
    assert t.label_names == ("neg", "pos") and t.labels == (1, 0, 1)
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    t = load_task(str(tmp_path / "d.jsonl"), label_names=("no", "yes"))
    assert t.labels == (0, 1) and t.label_names == ("no", "yes")


def test_file_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("sentence,label\nx,1\n")
    with pytest.raises(TaskError, match=r"missing column\(s\) \['text'\]"):
        load_task(str(tmp_path / "bad.csv"))
    (tmp_path / "int.csv").write_text("text,label\nx,1\ny,0\n")
    with pytest.raises(TaskError, match="integer labels need label words"):
        load_task(str(tmp_path / "int.csv"))
    with pytest.raises(TaskError, match="does not exist"):
        load_task(str(tmp_path / "nope.csv"))


def test_unknown_task():
    with pytest.raises(TaskError, match="unknown task 'sst9'.*vader-words"):
        load_task("sst9")


def test_toy_task_labels():
    t = load_task("toy")
    first = np.array([int(x.split()[0][1:]) for x in t.texts])
    assert np.array_equal(first % 2, np.array(t.labels))


# ------------------------------------------------------------ vega-cars ---


def test_vega_cars_follows_cars_json():
    """Every kept name has the one origin cars.json gives it; 3 balanced classes, no repeated input."""
    origins = defaultdict(set)
    for car in json.loads(cars_json().read_text()):
        origins[" ".join(car["Name"].split())].add(car["Origin"])
    task = load_task("vega-cars")
    assert task.label_names == CAR_ORIGINS == ("USA", "Europe", "Japan") and task.n_classes == 3
    counts = task.class_counts()
    assert len(set(counts)) == 1 and counts[0] >= 50, counts  # 59 each: Japan has 59 distinct names
    assert len(set(task.texts)) == len(task) and set(task.labels) == {0, 1, 2}
    for text, y in zip(task.texts, task.labels):
        assert origins[text] == {task.label_names[y]}, text
    assert task.template.example == "Car: {input}\nOrigin: {label}"


def test_vega_cars_balance_is_seeded():
    a, b = load_task("vega-cars", seed=0), load_task("vega-cars", seed=1)
    assert a.texts == load_task("vega-cars", seed=0).texts and a.texts != b.texts
    assert a.class_counts() == b.class_counts()


def test_vega_cars_refused_by_the_tiny_word_tokenizer():
    """The tiny model's word-level vocabulary has no car names or origins: the run stops before any compute."""
    with pytest.raises(PromptError, match="tokenizes to <unk>"):
        check_tokenization(load_task("vega-cars"), tiny_tokenizer())


@pytest.fixture(scope="module", params=["gemma3-270m", "smollm2-135m"])
def real_loaded(request):
    """Both embedded models (the default one is the session's ``real``; downloads on first use)."""
    from mechicl.models.loading import load_model
    from mechicl.models.registry import DEFAULT_MODEL

    return request.getfixturevalue("real") if request.param == DEFAULT_MODEL else load_model(request.param)


@pytest.mark.real_model
def test_vega_cars_label_words_are_single_tokens_on_real_tokenizers(real_loaded):
    tok, bos = real_loaded.tokenizer, real_loaded.prepend_bos
    task = load_task("vega-cars")
    check_tokenization(task, tok)
    ids = label_token_ids(tok, task.template, task.label_names, bos)
    assert [tok.decode([i]) for i in ids] == [" USA", " Europe", " Japan"]
    every = torch.arange(len(task)).reshape(-1, 3)  # every car once, three per context
    for cond in ("default", "flipped"):  # one token after every input of the task, in context too
        b = build_prompt_batch(task, tok, every, cond, n_ctx=real_loaded.n_ctx, prepend_bos=bos)
        assert b.label_token_seqs is None
        assert torch.equal(b.tokens.gather(1, b.label_pos), b.label_token_ids[b.shown_labels])


# --------------------------------------------------- file-task balancing ---


def _a10_b4(tmp_path):
    path = tmp_path / "ab.csv"
    path.write_text("text,label\n" + "".join(f"w{i},{'a' if i < 10 else 'b'}\n" for i in range(14)))
    return str(path)


def test_file_tasks_are_balanced_with_a_warning(tmp_path):
    path = _a10_b4(tmp_path)
    with pytest.warns(
        TaskWarning, match=r"balanced to 4 rows each \(seed 3\): kept 8 of 14 rows \(counts were a: 10, b: 4\)"
    ):
        t = load_task(path, seed=3)
    assert t.class_counts() == [4, 4] and len(t) == 8
    assert [x for x, y in zip(t.texts, t.labels) if y == 1] == ["w10", "w11", "w12", "w13"]  # the small class whole
    assert list(t.texts) == sorted(t.texts, key=lambda w: int(w[1:]))  # file order kept
    with pytest.warns(TaskWarning):
        assert load_task(path, seed=3).texts == t.texts
    with pytest.warns(TaskWarning):
        assert any(load_task(path, seed=s).texts != t.texts for s in range(4, 8))


def test_balance_false_keeps_every_row_without_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = load_task(_a10_b4(tmp_path), balance=False)
    assert len(t) == 14 and t.class_counts() == [10, 4]


def test_a_label_name_without_rows_is_an_error(tmp_path):
    """A declared class no row uses would be scored, and "flipped" would rotate labels onto it (issue 30)."""
    rows = [{"text": f"w{i}", "label": i % 2} for i in range(6)] + [{"text": "w9", "label": 0}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(TaskError, match=r"no row has the label 'maybe' \(class 2\).*--label-names no,yes\)"):
        load_task(str(tmp_path / "d.jsonl"), label_names=("no", "yes", "maybe"))
    with pytest.warns(TaskWarning, match="kept 6 of 7 rows"):
        assert load_task(str(tmp_path / "d.jsonl"), label_names=("no", "yes")).class_counts() == [3, 3]
    (tmp_path / "t.csv").write_text("text,label\nw1,x\nw2,y\n")
    with pytest.raises(TaskError, match=r"no row has the label 'z' \(class 2\)"):
        load_task(str(tmp_path / "t.csv"), label_names=("x", "y", "z"))
    (tmp_path / "e.csv").write_text("text,label\nw1,x\nw2,y\nw3,z\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_task(str(tmp_path / "e.csv"))) == 3


def test_one_mistyped_label_is_an_error_naming_its_line(tmp_path):
    body = [f"w{i},{'neg' if i % 2 else 'pos'}" for i in range(40)]
    (tmp_path / "d.csv").write_text("\n".join(["text,label", *body[:10], "w50,good", *body[10:]]) + "\n")
    with pytest.raises(
        TaskError, match=r"the label 'good' is on only 1 row\(s\) \(line 12\) beside 'neg': 20, 'pos': 20"
    ):
        load_task(str(tmp_path / "d.csv"))  # the header is line 1, then 10 rows
    with pytest.raises(TaskError, match=r"3-class task balanced down to 1 row\(s\) per class\. Fix the label"):
        load_task(str(tmp_path / "d.csv"), balance=False)  # wrong with or without balancing: 3 classes
    with pytest.warns(TaskWarning, match="balanced to 1 rows"):  # kept on purpose: the classes are named
        assert load_task(str(tmp_path / "d.csv"), label_names=("good", "neg", "pos")).n_classes == 3
    small = "".join(f"w{i},{'abc'[i % 3]}\n" for i in range(6)) + "w9,a\n"  # 3/2/2 rows: small, not a typo
    (tmp_path / "s.csv").write_text("text,label\n" + small)
    with pytest.warns(TaskWarning):
        assert load_task(str(tmp_path / "s.csv")).class_counts() == [2, 2, 2]
    few = "".join(f"w{i},{'neg' if i % 2 else 'pos'}\n" for i in range(80)) + "w90,neu\nw91,neu\nw92,neu\nw93,neu\n"
    (tmp_path / "f.csv").write_text("text,label\n" + few)  # 4 of 'neu' beside 40: rare, all four lines named
    with pytest.raises(TaskError, match=r"'neu' is on only 4 row\(s\) \(line 82, 83, 84, 85\)"):
        load_task(str(tmp_path / "f.csv"))
    (tmp_path / "g.csv").write_text("text,label\n" + few.replace("w93,neu", "w93,pos"))  # 3 beside 40
    with pytest.raises(TaskError, match=r"'neu' is on only 3 row\(s\)"):
        load_task(str(tmp_path / "g.csv"))
    (tmp_path / "h.csv").write_text("text,label\n" + few[: few.index("w58,")] + "w90,neu\nw91,neu\nw92,neu\n")
    with pytest.warns(TaskWarning, match="balanced to 3 rows"):  # 3 beside 29 each: not ten times fewer, kept
        load_task(str(tmp_path / "h.csv"))
