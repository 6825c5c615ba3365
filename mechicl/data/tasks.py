"""Labelled classification tasks: texts, class indices, label words and a default template.

Sources (see ``load_task``):
  ``vader-words``                 VADER lexicon words (in the vaderSentiment wheel), label = sign of
                                  the mean human rating, |rating| >= 1.5, classes balanced.
  ``vader-movies|tweets|nyt|amazon``  human-rated sentences from ``hutto_ICWSM_2014.tar.gz`` inside
                                  the vaderSentiment==3.3.2 sdist (downloaded once, hash-checked);
                                  label = sign of the mean rating, |rating| < 1.0 dropped, balanced.
  ``vega-cars``                   car model names -> origin (USA / Europe / Japan), 3 classes, from
                                  ``cars.json`` in the vega_datasets==0.9.0 wheel (hash-checked);
                                  names de-duplicated, names with conflicting origins dropped, balanced.
  ``toy``                         synthetic words for the tiny test model.
  ``organism``                    the model organisms' synthetic language (``mechicl.data.organism``).
  ``*.csv`` / ``*.jsonl``         local files with ``text`` and ``label`` columns; classes balanced
                                  by default (seeded; a warning gives the counts), ``balance=False``
                                  keeps every row.
  ``hf:<dataset id>``             a Hugging Face dataset (needs the Hub); balanced like files.
No third-party text is stored in this repository.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tarfile
import threading
import warnings
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from mechicl.data.fetch import cache_dir, cached_member, pip_download
from mechicl.data.organism import organism_task
from mechicl.data.task import SENTIMENT, Task, Template
from mechicl.data.taskfiles import TaskWarning, checked_row, read_rows, rows_to_task
from mechicl.data.words import TOY_WORDS
from mechicl.errors import ResourceUnavailable, TaskError

VADER_SDIST = ("vaderSentiment==3.3.2", "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9")
HUTTO_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
HUTTO_SHA256 = "d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa"
HUTTO_FILES = {
    "vader-movies": ("movieReviewSnippets_GroundTruth.txt", "Review"),
    "vader-tweets": ("tweets_GroundTruth.txt", "Tweet"),
    "vader-nyt": ("nytEditorialSnippets_GroundTruth.txt", "Text"),
    "vader-amazon": ("amazonReviewSnippets_GroundTruth.txt", "Review"),
}
VEGA_WHEEL = ("vega_datasets==0.9.0", "3d7c63917be6ca9b154b565f4779a31fedce57b01b5b9d99d8a34a7608062a1d")
CARS_MEMBER = "vega_datasets/_data/cars.json"
CARS_SHA256 = "f686a53678b21f4231e2f6a5ba7ce5761d9d39204fccdea1caa29fb8c460e319"
CAR_ORIGINS = ("USA", "Europe", "Japan")  # the file's own values; each one token after "Origin:" (tests)


def known_tasks() -> list[str]:
    return ["vader-words", *HUTTO_FILES, "vega-cars", "toy", "organism"]


def load_task(spec: str, *, seed: int = 0, label_names: tuple[str, ...] | None = None, balance: bool = True) -> Task:
    """Resolve a task name or path (see module docstring).

    ``seed`` seeds class balancing. ``balance`` applies to user data (``.csv``/``.jsonl`` files and
    ``hf:`` datasets): True (default) downsamples every class to the smallest one and warns with the
    counts; False keeps every row. Built-in tasks are always balanced.
    """
    if spec == "vader-words":
        return vader_words(seed=seed)
    if spec in HUTTO_FILES:
        return vader_sentences(spec, seed=seed)
    if spec == "vega-cars":
        return vega_cars(seed=seed)
    if spec == "toy":
        return toy_task(seed=seed)
    if spec == "organism":
        return organism_task(seed=seed)
    if spec.startswith("hf:"):
        task = hf_dataset(spec[3:], label_names=label_names)
        return balanced(task, seed) if balance else task
    path = Path(spec).expanduser()
    if path.suffix in {".csv", ".jsonl"}:
        if not path.is_file():
            raise TaskError(f"task file {path} does not exist")
        return file_task(path, label_names=label_names, balance=balance, seed=seed)
    raise TaskError(
        f"unknown task {spec!r}. Use one of {', '.join(known_tasks())}, a .csv/.jsonl file with "
        f"'text' and 'label' columns, or 'hf:<dataset id>'."
    )


def _balance(texts: list[str], labels: list[int], n_classes: int, seed: int) -> tuple[list[str], list[int]]:
    """Downsample every class to the size of the smallest one (seeded), keep original order.

    Classes with no rows at all (a ``label_names`` word no row uses) are left out of the minimum.
    """
    y = np.asarray(labels)
    present = [c for c in range(n_classes) if (y == c).any()]
    n = min(int((y == c).sum()) for c in present)
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), n, replace=False) for c in present]))
    return [texts[i] for i in keep], [labels[i] for i in keep]


def balanced(task: Task, seed: int) -> Task:
    """``task`` with every class downsampled to its smallest class (seeded, ``_balance``); warns
    (``TaskWarning``) with the per-class counts whenever rows are dropped."""
    counts = task.class_counts()
    present = [n for n in counts if n]
    if len(set(present)) <= 1:
        return task
    texts, labels = _balance(list(task.texts), list(task.labels), task.n_classes, seed)
    before = ", ".join(f"{w}: {n}" for w, n in zip(task.label_names, counts))
    warnings.warn(
        f"{task.name}: classes balanced to {min(present)} rows each (seed {seed}): kept {len(texts)} of "
        f"{len(task)} rows (counts were {before}); pass balance=False (--no-balance) to keep every row",
        TaskWarning,
        stacklevel=2,
    )
    return Task(
        task.name,
        tuple(texts),
        tuple(labels),
        task.label_names,
        task.template,
        f"{task.description}, balanced ({len(texts)} of {len(task)} rows)",
    )


_WORD = re.compile(r"[a-z][a-z'\-]*[a-z]")


def vader_words(min_abs_rating: float = 1.5, seed: int = 0) -> Task:
    """VADER lexicon entries that are plain lower-case words, labelled by the sign of the mean rating."""
    lex = resources.files("vaderSentiment").joinpath("vader_lexicon.txt").read_text(encoding="utf-8")
    ratings: dict[str, float] = {}
    for line in lex.splitlines():  # a few words appear twice; the last entry wins, as in VADER itself
        parts = line.split("\t")
        if len(parts) >= 2 and _WORD.fullmatch(parts[0]):
            ratings[parts[0]] = float(parts[1])
    kept = [(w, r) for w, r in ratings.items() if abs(r) >= min_abs_rating]
    texts, labels = [w for w, _ in kept], [int(r > 0) for _, r in kept]
    texts, labels = _balance(texts, labels, 2, seed)
    return Task(
        "vader-words",
        tuple(texts),
        tuple(labels),
        SENTIMENT,
        Template("Word: {input}\nSentiment: {label}", "\n\n"),
        f"VADER lexicon words with |mean rating| >= {min_abs_rating}, balanced ({len(texts)} words)",
    )


def hutto_archive() -> Path:
    """The ICWSM-2014 ratings archive, extracted from the vaderSentiment sdist (cached)."""
    sdist = lambda: pip_download(VADER_SDIST[0], sdist=True, sha256=VADER_SDIST[1])  # noqa: E731
    return cached_member(cache_dir() / "data" / "hutto_ICWSM_2014.tar.gz", HUTTO_SHA256, sdist, HUTTO_MEMBER)


def vader_sentences(name: str, min_abs_rating: float = 1.0, seed: int = 0) -> Task:
    """Human-rated sentences (id, mean rating, text) from one of the ICWSM-2014 ground-truth files."""
    fname, noun = HUTTO_FILES[name]
    with tarfile.open(hutto_archive()) as t:
        member = next((m for m in t.getmembers() if m.name.endswith("/" + fname)), None)
        if member is None:
            raise ResourceUnavailable(f"{fname} is missing from the ICWSM-2014 archive")
        raw = t.extractfile(member).read()  # type: ignore[union-attr]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    texts, labels = [], []
    for line in text.splitlines():
        parts = line.split("\t", 2)
        if len(parts) != 3:
            continue
        rating, sentence = float(parts[1]), " ".join(parts[2].split())
        if abs(rating) >= min_abs_rating and sentence:
            texts.append(sentence)
            labels.append(int(rating > 0))
    texts, labels = _balance(texts, labels, 2, seed)
    return Task(
        name,
        tuple(texts),
        tuple(labels),
        SENTIMENT,
        Template(noun + ": {input}\nSentiment: {label}", "\n\n"),
        f"{fname} from hutto_ICWSM_2014 (vaderSentiment sdist), |mean rating| >= {min_abs_rating}, "
        f"balanced ({len(texts)} sentences)",
    )


def cars_json() -> Path:
    """``cars.json`` (vega_datasets 0.9.0: 406 cars with ``Name`` and ``Origin``), extracted from the wheel (cached)."""
    wheel = lambda: pip_download(VEGA_WHEEL[0], sha256=VEGA_WHEEL[1])  # noqa: E731
    return cached_member(cache_dir() / "data" / "vega_cars.json", CARS_SHA256, wheel, CARS_MEMBER)


def vega_cars(seed: int = 0) -> Task:
    """Car model names labelled with their origin; one row per distinct name (first-seen order), names
    listed with two different origins dropped, then balanced (59 per class with the recorded file)."""
    origins: dict[str, set[str]] = {}
    for car in json.loads(cars_json().read_text(encoding="utf-8")):
        name = " ".join(str(car.get("Name") or "").split())
        if name and car.get("Origin") in CAR_ORIGINS:
            origins.setdefault(name, set()).add(car["Origin"])
    kept = [(name, o.pop()) for name, o in origins.items() if len(o) == 1]
    texts, labels = [n for n, _ in kept], [CAR_ORIGINS.index(o) for _, o in kept]
    texts, labels = _balance(texts, labels, len(CAR_ORIGINS), seed)
    return Task(
        "vega-cars",
        tuple(texts),
        tuple(labels),
        CAR_ORIGINS,
        Template("Car: {input}\nOrigin: {label}", "\n\n"),
        f"car names -> origin from cars.json (vega_datasets==0.9.0 wheel): {len(origins)} distinct names, "
        f"{len(origins) - len(kept)} with conflicting origins dropped, balanced ({len(texts)} cars)",
    )


def toy_task(n: int = 256, seed: int = 0) -> Task:
    """Two-word inputs over ``w0..w63``; the class is the parity of the first word's index."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(TOY_WORDS), size=(n, 2))
    texts = tuple(f"{TOY_WORDS[a]} {TOY_WORDS[b]}" for a, b in idx)
    labels = tuple(int(a % 2) for a in idx[:, 0])
    return Task("toy", texts, labels, ("negative", "positive"), Template("Input: {input}\nLabel: {label}"), "synthetic")


def file_task(path: Path, label_names: tuple[str, ...] | None = None, *, balance: bool = True, seed: int = 0) -> Task:
    """A CSV (comma-separated, header row, UTF-8) or JSONL file with ``text`` and ``label`` for every row;
    with ``balance`` (default) every class is downsampled to the smallest (``balanced``, seeded by ``seed``)."""
    task = rows_to_task(str(path), read_rows(path), label_names)
    return balanced(task, seed) if balance else task


def hub_offline(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached now (``HF_HUB_OFFLINE`` set, or no TCP connection to it
    within ``timeout`` seconds), or None when it can."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in {"", "0", "false", "no"}:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    ok: list[bool] = []

    def probe() -> None:  # in a thread: a DNS lookup ignores socket timeouts
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return None if ok else f"no connection to {host}:{port} within {timeout:g} s"


def hf_dataset(dataset_id: str, split: str = "train", label_names: tuple[str, ...] | None = None) -> Task:
    """A Hub dataset with ``text`` and ``label`` columns (class names read from its features).

    Fails at once when the Hub cannot be reached (``hub_offline``) instead of retrying.
    """
    fix = (
        f"Fix: export it to CSV/JSONL with 'text' and 'label' columns and pass the file path, or use a "
        f"built-in task ({', '.join(known_tasks())})."
    )
    why = hub_offline()
    if why is not None and why != "HF_HUB_OFFLINE is set":  # with the variable set, datasets reads its cache only
        raise ResourceUnavailable(
            f"cannot load dataset {dataset_id!r}: the Hugging Face Hub is unreachable ({why}). {fix}"
        )
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:
        raise ResourceUnavailable(
            f"could not load dataset {dataset_id!r} from the Hugging Face Hub ({type(e).__name__}). "
            f"This machine may be offline. {fix}"
        ) from e
    feat = ds.features.get("label")
    names = label_names or tuple(getattr(feat, "names", ()) or ())
    rows = [(i + 1, r["text"], names[r["label"]] if names else r["label"]) for i, r in enumerate(ds)]
    return rows_to_task(f"hf:{dataset_id}", [checked_row(Path(f"hf:{dataset_id}"), *r) for r in rows], names or None)
