from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from mechicl.data.tasks import load_task
from mechicl.errors import TaskError


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
    t = load_task(str(tmp_path / "d.csv"))
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
