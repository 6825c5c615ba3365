"""Labelled classification tasks: texts, class indices, label words and a default template.

Sources (see ``load_task``):
  ``vader-words``                 VADER lexicon words (in the vaderSentiment wheel), label = sign of
                                  the mean human rating, |rating| >= 1.5, classes balanced.
  ``vader-movies|tweets|nyt|amazon``  human-rated sentences from ``hutto_ICWSM_2014.tar.gz`` inside
                                  the vaderSentiment==3.3.2 sdist (downloaded once, hash-checked);
                                  label = sign of the mean rating, |rating| < 1.0 dropped, balanced.
  ``toy``                         synthetic words for the tiny test model.
  ``organism``                    the model organisms' synthetic language (``mechicl.data.organism``).
  ``*.csv`` / ``*.jsonl``         local files with ``text`` and ``label`` columns.
  ``hf:<dataset id>``             a Hugging Face dataset (needs the Hub).
No third-party text is stored in this repository.
"""

from __future__ import annotations

import csv
import json
import re
import tarfile
from importlib import resources
from pathlib import Path

import numpy as np

from mechicl.data.fetch import cache_dir, extract_member, pip_download, verify_sha256
from mechicl.data.organism import organism_task
from mechicl.data.task import SENTIMENT, Task, Template
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


def known_tasks() -> list[str]:
    return ["vader-words", *HUTTO_FILES, "toy", "organism"]


def load_task(spec: str, *, seed: int = 0, label_names: tuple[str, ...] | None = None) -> Task:
    """Resolve a task name or path (see module docstring)."""
    if spec == "vader-words":
        return vader_words(seed=seed)
    if spec in HUTTO_FILES:
        return vader_sentences(spec, seed=seed)
    if spec == "toy":
        return toy_task(seed=seed)
    if spec == "organism":
        return organism_task(seed=seed)
    if spec.startswith("hf:"):
        return hf_dataset(spec[3:], label_names=label_names)
    path = Path(spec).expanduser()
    if path.suffix in {".csv", ".jsonl"}:
        if not path.is_file():
            raise TaskError(f"task file {path} does not exist")
        return file_task(path, label_names=label_names)
    raise TaskError(
        f"unknown task {spec!r}. Use one of {', '.join(known_tasks())}, a .csv/.jsonl file with "
        f"'text' and 'label' columns, or 'hf:<dataset id>'."
    )


def _balance(texts: list[str], labels: list[int], n_classes: int, seed: int) -> tuple[list[str], list[int]]:
    """Downsample every class to the size of the smallest one (seeded), keep original order."""
    y = np.asarray(labels)
    n = min(int((y == c).sum()) for c in range(n_classes))
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), n, replace=False) for c in range(n_classes)]))
    return [texts[i] for i in keep], [labels[i] for i in keep]


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
    target = cache_dir() / "data" / "hutto_ICWSM_2014.tar.gz"
    if not target.exists():
        sdist = verify_sha256(pip_download(VADER_SDIST[0], sdist=True), VADER_SDIST[1])
        extract_member(sdist, HUTTO_MEMBER, target)
    return verify_sha256(target, HUTTO_SHA256)


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


def toy_task(n: int = 256, seed: int = 0) -> Task:
    """Two-word inputs over ``w0..w63``; the class is the parity of the first word's index."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(TOY_WORDS), size=(n, 2))
    texts = tuple(f"{TOY_WORDS[a]} {TOY_WORDS[b]}" for a, b in idx)
    labels = tuple(int(a % 2) for a in idx[:, 0])
    return Task("toy", texts, labels, ("negative", "positive"), Template("Input: {input}\nLabel: {label}"), "synthetic")


def _rows_to_task(name: str, rows: list[dict], label_names: tuple[str, ...] | None) -> Task:
    if not rows:
        raise TaskError(f"{name}: no rows")
    missing = {"text", "label"} - set(rows[0])
    if missing:
        raise TaskError(f"{name}: missing column(s) {sorted(missing)}; found {sorted(rows[0])}")
    raw = [str(r["label"]).strip() for r in rows]
    if all(re.fullmatch(r"\d+", v) for v in raw):
        labels = [int(v) for v in raw]
        n = max(labels) + 1
        names = label_names or tuple(f"class{i}" for i in range(n))
        if label_names is None:
            raise TaskError(f"{name}: integer labels need label words; pass label_names (e.g. --label-names negative,positive)")
    else:
        names = label_names or tuple(sorted(set(raw)))
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise TaskError(f"{name}: labels {unknown} are not in label_names {names}")
        labels = [names.index(v) for v in raw]
    return Task(name, tuple(str(r["text"]) for r in rows), tuple(labels), tuple(names), Template(), f"file {name}")


def file_task(path: Path, label_names: tuple[str, ...] | None = None) -> Task:
    """A CSV (header row) or JSONL file with ``text`` and ``label`` columns."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return _rows_to_task(str(path), rows, label_names)


def hf_dataset(dataset_id: str, split: str = "train", label_names: tuple[str, ...] | None = None) -> Task:
    """A Hub dataset with ``text`` and ``label`` columns (class names read from its features)."""
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:
        raise ResourceUnavailable(
            f"could not load dataset {dataset_id!r} from the Hugging Face Hub ({type(e).__name__}). "
            f"This machine may be offline. Fix: export it to CSV/JSONL with 'text' and 'label' columns "
            f"and pass the file path, or use a built-in task ({', '.join(known_tasks())})."
        ) from e
    feat = ds.features.get("label")
    names = label_names or tuple(getattr(feat, "names", ()) or ())
    rows = [{"text": r["text"], "label": names[r["label"]] if names else r["label"]} for r in ds]
    return _rows_to_task(f"hf:{dataset_id}", rows, names or None)
