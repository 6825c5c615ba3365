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

import codecs
import csv
import io
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


Row = tuple[int, str, str]  # (line number, text, label) as read from a file


class TaskWarning(UserWarning):
    """Something odd in a task file that does not stop the run (duplicate rows)."""


def _rows_to_task(name: str, rows: list[Row], label_names: tuple[str, ...] | None) -> Task:
    """A task from (line, text, label) rows; classes are exactly the label values present (or ``label_names``)."""
    if not rows:
        raise TaskError(f"{name}: no data rows; a task file needs a 'text' and a 'label' for every example")
    _warn_duplicates(name, rows)
    raw = [label.strip() for _, _, label in rows]
    if all(re.fullmatch(r"\d+", v) for v in raw):
        if label_names is None:
            raise TaskError(f"{name}: integer labels need label words; pass label_names (e.g. --label-names negative,positive)")
        labels = [int(v) for v in raw]
        if max(labels) >= len(label_names):
            raise TaskError(f"{name}: labels go up to {max(labels)} but label_names gives {len(label_names)} words "
                            f"{label_names}; pass one word per class 0..{max(labels)}")
        names = tuple(label_names)
    else:
        names = tuple(label_names) if label_names else tuple(sorted(set(raw)))
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise TaskError(f"{name}: labels {unknown} are not in label_names {names}")
        labels = [names.index(v) for v in raw]
    if len(set(labels)) < 2:
        raise TaskError(f"{name}: every row has the label {names[labels[0]]!r}; a task needs at least two classes")
    return Task(name, tuple(text for _, text, _ in rows), tuple(labels), names, Template(), f"file {name}")


def _warn_duplicates(name: str, rows: list[Row]) -> None:
    """Warn (once per file) about repeated (text, label) rows and texts given different labels."""
    first: dict[str, tuple[int, str]] = {}
    dup, clash = [], []
    for line, text, label in rows:
        if text in first:
            (dup if first[text][1] == label.strip() else clash).append((first[text][0], line))
        else:
            first[text] = (line, label.strip())
    if dup:
        warnings.warn(f"{name}: {len(dup)} duplicate row(s) (same text and label), e.g. line {dup[0][1]} repeats "
                      f"line {dup[0][0]}; they are kept, so a context can show the same example twice", TaskWarning)
    if clash:
        warnings.warn(f"{name}: {len(clash)} text(s) appear with different labels, e.g. lines {clash[0][0]} and "
                      f"{clash[0][1]}; they are kept as given", TaskWarning)


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raise TaskError(f"{path} starts with a UTF-8 byte-order mark (BOM, as Excel's 'CSV UTF-8' writes); "
                        f"save it as plain UTF-8 without a BOM")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TaskError(f"{path} is not UTF-8 (byte 0x{raw[e.start]:02x} on line {line}); re-save it as UTF-8") from e


def _check_header(path: Path, header: list[str]) -> None:
    if {"text", "label"} <= set(header):
        return
    if len(header) == 1 and any(d in header[0] for d in ";\t|"):
        sep = next(d for d in ";\t|" if d in header[0])
        raise TaskError(f"{path}: the header {header[0]!r} looks {sep!r}-separated; mechicl reads comma-separated "
                        f"CSV: use ',' between columns (or a .jsonl file)")
    if {"text", "label"} <= {h.strip().lower() for h in header}:
        raise TaskError(f"{path}: found the columns {header}; column names are exact: rename them to 'text' and 'label'")
    missing = sorted({"text", "label"} - set(header))
    raise TaskError(f"{path}: missing column(s) {missing}; found {header}; the header must name 'text' and 'label'")


def _read_csv(path: Path) -> list[Row]:
    reader = csv.reader(io.StringIO(_decode(path), newline=""))
    try:
        header = next(reader, None)
        if not header:
            raise TaskError(f"{path} is empty; the first line must be the header text,label")
        _check_header(path, header)
        it, il = header.index("text"), header.index("label")
        rows, start = [], reader.line_num + 1
        for row in reader:  # ``start``: the line a record begins on (a quoted text may span lines)
            line, start = start, reader.line_num + 1
            if len(row) <= 1 and not "".join(row).strip():  # a blank line
                continue
            if len(row) != len(header):
                raise TaskError(f"{path} line {line}: {len(row)} field(s) but the header has {len(header)} "
                                f"({','.join(header)}); quote texts that contain commas")
            rows.append(_checked(path, line, row[it], row[il]))
    except csv.Error as e:
        raise TaskError(f"{path} line {reader.line_num}: not valid CSV ({e})") from e
    return rows


def _checked(path: Path, line: int, text: object, label: object) -> Row:
    """One row's text and label, or a TaskError naming the line."""
    for key, v in (("text", text), ("label", label)):
        if v is None:
            raise TaskError(f"{path} line {line}: {key!r} is missing or null; every row needs a text and a label")
        if key == "label" and isinstance(v, int) and not isinstance(v, bool):
            continue
        if not isinstance(v, str):
            raise TaskError(f"{path} line {line}: {key!r} is {type(v).__name__} {v!r}; it must be a string")
        if not v.strip():
            raise TaskError(f"{path} line {line}: empty {key!r}; every row needs a text and a label")
    return line, str(text), str(label)


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    for i, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path} line {i}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                            f"object like {{\"text\": \"...\", \"label\": \"...\"}}") from e
        if not isinstance(obj, dict):
            raise TaskError(f"{path} line {i}: a JSON {type(obj).__name__}, not an object with 'text' and 'label'")
        missing = [k for k in ("text", "label") if k not in obj]
        if missing:
            raise TaskError(f"{path} line {i}: missing key(s) {missing}; found {sorted(obj)}")
        rows.append(_checked(path, i, obj["text"], obj["label"]))
    return rows


def file_task(path: Path, label_names: tuple[str, ...] | None = None) -> Task:
    """A CSV (comma-separated, header row, UTF-8) or JSONL file with ``text`` and ``label`` for every row."""
    rows = _read_csv(path) if path.suffix == ".csv" else _read_jsonl(path)
    return _rows_to_task(str(path), rows, label_names)


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
    fix = (f"Fix: export it to CSV/JSONL with 'text' and 'label' columns and pass the file path, or use a "
           f"built-in task ({', '.join(known_tasks())}).")
    why = hub_offline()
    if why is not None and why != "HF_HUB_OFFLINE is set":  # with the variable set, datasets reads its cache only
        raise ResourceUnavailable(f"cannot load dataset {dataset_id!r}: the Hugging Face Hub is unreachable ({why}). {fix}")
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
    return _rows_to_task(f"hf:{dataset_id}", [_checked(Path(f"hf:{dataset_id}"), *r) for r in rows], names or None)
