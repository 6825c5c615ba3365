"""Reading task files: a ``.csv`` or ``.jsonl`` with ``text`` and ``label`` for every row, checked line by line.

``read_rows(path)`` gives (line, text, label) rows; ``rows_to_task`` turns rows into a ``Task`` (classes =
the label values present, or ``label_names``) and warns (``TaskWarning``) about duplicate rows. Class
balancing is the catalogue's job (``mechicl.data.tasks.balanced``).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import warnings
from pathlib import Path

from mechicl.data.task import Task, Template
from mechicl.errors import TaskError

Row = tuple[int, str, str]  # (line number, text, label) as read from a file


class TaskWarning(UserWarning):
    """Something odd in a task file that does not stop the run (duplicate rows)."""


def rows_to_task(name: str, rows: list[Row], label_names: tuple[str, ...] | None) -> Task:
    """A task from (line, text, label) rows; classes are exactly the label values present (or ``label_names``)."""
    if not rows:
        raise TaskError(f"{name}: no data rows; a task file needs a 'text' and a 'label' for every example")
    _warn_duplicates(name, rows)
    raw = [label.strip() for _, _, label in rows]
    if all(re.fullmatch(r"\d+", v) for v in raw):
        if label_names is None:
            raise TaskError(
                f"{name}: integer labels need label words; pass label_names (e.g. --label-names negative,positive)"
            )
        labels = [int(v) for v in raw]
        if max(labels) >= len(label_names):
            raise TaskError(
                f"{name}: labels go up to {max(labels)} but label_names gives {len(label_names)} words "
                f"{label_names}; pass one word per class 0..{max(labels)}"
            )
        names = tuple(label_names)
    else:
        names = tuple(label_names) if label_names else tuple(sorted(set(raw)))
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise TaskError(f"{name}: labels {unknown} are not in label_names {names}")
        labels = [names.index(v) for v in raw]
    if len(set(labels)) < 2:
        raise TaskError(f"{name}: every row has the label {names[labels[0]]!r}; a task needs at least two classes")
    _check_classes(name, rows, labels, names, inferred=label_names is None)
    return Task(name, tuple(text for _, text, _ in rows), tuple(labels), names, Template(), f"file {name}")


RARE_ROWS = 5  # an inferred class with at most this many rows and under a tenth of the largest class: a typo?


def _check_classes(name: str, rows: list[Row], labels: list[int], names: tuple[str, ...], inferred: bool) -> None:
    """Every class has rows (a label word no row uses would be a class the model is scored on, and that "flipped"
    rotates labels onto, with no examples). With classes inferred from the file, a class of at most ``RARE_ROWS``
    rows beside one ten times larger is taken for a mistyped label: it would turn a 2-class task into a 3-class
    one balanced down to its few rows. ``label_names`` keeps such a class on purpose."""
    counts = [labels.count(c) for c in range(len(names))]
    present = [w for w, n in zip(names, counts) if n]
    empty = [f"{w!r} (class {c})" for c, (w, n) in enumerate(zip(names, counts)) if not n]
    if empty:
        raise TaskError(
            f"{name}: no row has the label {', '.join(empty)}; label_names gives {len(names)} classes {names} but "
            f"the file uses {len(present)}. Pass only the classes present (--label-names {','.join(present)}) or add "
            f"rows of the missing class"
        )
    largest = max(counts)
    rare = [c for c, n in enumerate(counts) if n <= RARE_ROWS and n * 10 <= largest]
    if inferred and rare:
        c = rare[0]
        lines = [line for (line, _, _), y in zip(rows, labels) if y == c]
        where = ", ".join(map(str, lines[:5])) + (" ..." if len(lines) > 5 else "")
        others = ", ".join(f"{w!r}: {n}" for w, n in zip(names, counts) if w != names[c])
        raise TaskError(
            f"{name}: the label {names[c]!r} is on only {counts[c]} row(s) (line {where}) beside {others}: a "
            f"mistyped label would make a {len(names)}-class task balanced down to {min(counts)} row(s) per class. "
            f"Fix the label on that line, or pass --label-names {','.join(names)} if {names[c]!r} is a real class"
        )


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
        warnings.warn(
            f"{name}: {len(dup)} duplicate row(s) (same text and label), e.g. line {dup[0][1]} repeats "
            f"line {dup[0][0]}; they are kept, so a context can show the same example twice",
            TaskWarning,
            stacklevel=2,
        )
    if clash:
        warnings.warn(
            f"{name}: {len(clash)} text(s) appear with different labels, e.g. lines {clash[0][0]} and "
            f"{clash[0][1]}; they are kept as given",
            TaskWarning,
            stacklevel=2,
        )


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raise TaskError(
            f"{path} starts with a UTF-8 byte-order mark (BOM, as Excel's 'CSV UTF-8' writes); "
            f"save it as plain UTF-8 without a BOM"
        )
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
        raise TaskError(
            f"{path}: the header {header[0]!r} looks {sep!r}-separated; mechicl reads comma-separated "
            f"CSV: use ',' between columns (or a .jsonl file)"
        )
    if {"text", "label"} <= {h.strip().lower() for h in header}:
        raise TaskError(
            f"{path}: found the columns {header}; column names are exact: rename them to 'text' and 'label'"
        )
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
                raise TaskError(
                    f"{path} line {line}: {len(row)} field(s) but the header has {len(header)} "
                    f"({','.join(header)}); quote texts that contain commas"
                )
            rows.append(checked_row(path, line, row[it], row[il]))
    except csv.Error as e:
        raise TaskError(f"{path} line {reader.line_num}: not valid CSV ({e})") from e
    return rows


def checked_row(path: Path, line: int, text: object, label: object) -> Row:
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
            raise TaskError(
                f"{path} line {i}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                f'object like {{"text": "...", "label": "..."}}'
            ) from e
        if not isinstance(obj, dict):
            raise TaskError(f"{path} line {i}: a JSON {type(obj).__name__}, not an object with 'text' and 'label'")
        missing = [k for k in ("text", "label") if k not in obj]
        if missing:
            raise TaskError(f"{path} line {i}: missing key(s) {missing}; found {sorted(obj)}")
        rows.append(checked_row(path, i, obj["text"], obj["label"]))
    return rows


def read_rows(path: Path) -> list[Row]:
    """The (line, text, label) rows of a ``.csv`` (comma-separated, header row, UTF-8) or ``.jsonl`` file."""
    return _read_csv(path) if path.suffix == ".csv" else _read_jsonl(path)
