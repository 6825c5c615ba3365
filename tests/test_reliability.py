"""Issue 15, table-driven: every bad input gives exit code 2, one line ``mechicl: error: ...`` that names
the problem, and leaves no run folder (nor a partial one) behind. Each row is one input from the issue:
argv, file contents or a config snippet, run through ``cli.main`` in-process on ``tiny`` / organisms.

Rows are checked before any compute; the few that need the model (its tokenizer, its head count) load
only ``tiny`` or an organism (milliseconds). The silently-wrong rows that are not user errors (intervals,
verdicts, summaries, config.json) and the atomic folders are tested in ``tests/test_reliability_runs.py``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from mechicl.cli import main

B = ["behavior", "--model", "tiny", "--task", "toy", "--k", "2", "--n-contexts", "3", "--out", "out"]
INSIDE = ["--model", "tiny", "--task", "toy", "--n-contexts", "3", "--k", "4", "--k-min", "2", "--out", "out"]
HEADS = [
    "heads",
    "--model",
    "tiny",
    "--task",
    "toy",
    "--k",
    "4",
    "--n-screen",
    "4",
    "--n-eval",
    "6",
    "--candidates",
    "3",
    "--n-control",
    "5",
    "--out",
    "out",
]
PATCH = ["patch", "--model", "tiny", "--task", "toy", "--n-contexts", "2", "--k", "3", "--out", "out"]
GOOD = "".join(f"w{i} w{i + 1},{'negative' if i % 2 else 'positive'}\n" for i in range(40))
CONFIG = """name = "x"
hypothesis = "NH1"
statement = "s"
task = "toy"
model = "tiny"
{top}
[[conditions]]
labels = "default"
[[conditions]]
labels = "random"
[[tests]]
a = "default/accuracy"
b = "{b}"
{test}
"""


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag`` set to ``value`` (replaced if present, appended if not)."""
    if flag in argv:
        i = argv.index(flag)
        return [*argv[: i + 1], value, *argv[i + 2 :]]
    return [*argv, flag, value]


def _config(top: str = "", test: str = "", b: str = "random/accuracy_true") -> dict[str, bytes]:
    """A small valid config (k_max = 4, n_contexts = 4) with one top-level or test line replaced or added."""
    lines = {"k_max": "k_max = 4", "n_contexts": "n_contexts = 4"}
    if top:
        lines[top.split("=")[0].strip()] = top
    return {"c.toml": CONFIG.format(top="\n".join(lines.values()), test=test, b=b).encode()}


RUN = ["run", "c.toml", "--out", "out"]

# id -> (files to write, argv, pattern the one error line must match)
ROWS: dict[str, tuple[dict[str, bytes], list[str], str]] = {
    # ---- silently wrong data (now errors)
    "csv-row-missing-label": (
        {"d.csv": ("text,label\n" + GOOD + "w5 w6\n").encode()},
        _set(B, "--task", "d.csv"),
        r"d\.csv line 42: 1 field\(s\) but the header has 2",
    ),
    "jsonl-text-null": (
        {"d.jsonl": b'{"text": "w1", "label": "a"}\n{"text": null, "label": "b"}\n'},
        _set(B, "--task", "d.jsonl"),
        r"line 2: 'text' is missing or null",
    ),
    "switch-after-k-max": (
        {},
        _set(_set(B, "--k", "4"), "--conditions", "default,default>flipped@99"),
        r"default>flipped@99: .*switch at example 99 never happens; use @1\.\.@4",
    ),
    "tokens-become-unk": ({}, _set(B, "--model", "organism-strong"), r"template of task toy tokenizes to <unk>"),
    "run-bad-plot-metrics": (
        _config(top='plot_metrics = ["accuracy", "nope"]'),
        RUN,
        r"plot_metrics \['nope'\] are not in the results",
    ),
    # ---- issue 30: task files whose classes are not what they look like
    "csv-one-mistyped-label": (  # was: a 3-class task balanced to 1 row per class ("kept 3 of 41 rows"), exit 0
        {"d.csv": ("text,label\n" + GOOD + "w7 w9,good\n").encode()},
        _set(B, "--task", "d.csv"),
        r"d\.csv: the label 'good' is on only 1 row\(s\) \(line 42\) beside 'negative': 20, 'positive': 20.*"
        r"Fix the label on that line, or pass --label-names good,negative,positive if 'good' is a real class",
    ),
    "int-labels-label-name-without-rows": (  # was: class 2 scored and "flipped" onto, with no rows
        {"d.csv": ("text,label\n" + GOOD.replace(",negative", ",0").replace(",positive", ",1")).encode()},
        _set(_set(B, "--task", "d.csv"), "--label-names", "negative,positive,neutral"),
        r"no row has the label 'neutral' \(class 2\).*Pass only the classes present \(--label-names negative,positive\)",
    ),
    # ---- CLI arguments
    "n-contexts-0": ({}, _set(B, "--n-contexts", "0"), r"argument --n-contexts: must be an integer >= 2, got 0"),
    "n-contexts-1": ({}, _set(B, "--n-contexts", "1"), r"argument --n-contexts: must be an integer >= 2, got 1"),
    "n-contexts--2": ({}, _set(B, "--n-contexts", "-2"), r"argument --n-contexts: must be an integer >= 2, got -2"),
    "k-max--3": ({}, _set(B, "--k", "-3"), r"argument --k: must be an integer >= 0, got -3"),
    "batch-size-0": ({}, _set(B, "--batch-size", "0"), r"argument --batch-size: must be an integer >= 1, got 0"),
    "batch-size--1": ({}, _set(B, "--batch-size", "-1"), r"argument --batch-size: must be an integer >= 1, got -1"),
    "seed--1": ({}, _set(B, "--seed", "-1"), r"argument --seed: must be an integer >= 0, got -1"),
    "threads--1": ({}, _set(B, "--threads", "-1"), r"argument --threads: must be an integer >= 1, got -1"),
    "k-min-over-k": ({}, _set(HEADS, "--k-min", "9"), r"need 0 <= k_min <= k, got k_min=9, k=4"),
    "n-confirm-3": ({}, _set(HEADS, "--n-confirm", "3"), r"argument --n-confirm: must be an integer >= 4, got 3"),
    "ablation-unknown": ({}, _set(HEADS, "--ablation", "nosuch"), r"argument --ablation: invalid choice: 'nosuch'"),
    "n-control-0": ({}, _set(HEADS, "--n-control", "0"), r"argument --n-control: must be an integer >= 1, got 0"),
    "top--1": ({}, ["attention", *INSIDE, "--top", "-1"], r"argument --top: must be an integer >= 1, got -1"),
    "min-gap--1": (
        {},
        ["lens", *INSIDE, "--min-gap", "-1"],
        r"argument --min-gap: must be a number in \[0, 1\], got -1",
    ),
    "conditions-empty": ({}, _set(B, "--conditions", ""), r"--conditions is empty"),
    "patch-n-contexts-0": (
        {},
        _set(PATCH, "--n-contexts", "0"),
        r"argument --n-contexts: must be an integer >= 1, got 0",
    ),
    "heads-candidates-0": (
        {},
        _set(HEADS, "--candidates", "0"),
        r"argument --candidates: must be an integer >= 1, got 0",
    ),
    "heads-n-eval-1": ({}, _set(HEADS, "--n-eval", "1"), r"argument --n-eval: must be an integer >= 4, got 1"),
    # ---- files
    "csv-not-utf8": (
        {"d.csv": b"text,label\nw1 w2,caf\xe9\n"},
        _set(B, "--task", "d.csv"),
        r"d\.csv is not UTF-8 \(byte 0xe9 on line 2\); re-save it as UTF-8",
    ),
    "jsonl-malformed-line": (
        {"d.jsonl": b'{"text": "w1", "label": "a"}\n\n{"text": "w2", "label": \n'},
        _set(B, "--task", "d.jsonl"),
        r"d\.jsonl line 3: not valid JSON",
    ),
    "jsonl-missing-text": (
        {"d.jsonl": b'{"text": "w1", "label": "a"}\n{"label": "b"}\n'},
        _set(B, "--task", "d.jsonl"),
        r"d\.jsonl line 2: missing key\(s\) \['text'\]; found \['label'\]",
    ),
    "csv-bom": (
        {"d.csv": b"\xef\xbb\xbf" + ("text,label\n" + GOOD).encode()},
        _set(B, "--task", "d.csv"),
        r"d\.csv starts with a UTF-8 byte-order mark",
    ),
    "csv-semicolon": (
        {"d.csv": ("text;label\n" + GOOD.replace(",", ";")).encode()},
        _set(B, "--task", "d.csv"),
        r"header 'text;label' looks ';'-separated",
    ),
    "csv-capitalised-header": (
        {"d.csv": ("Text,Label\n" + GOOD).encode()},
        _set(B, "--task", "d.csv"),
        r"found the columns \['Text', 'Label'\]; column names are exact",
    ),
    # ---- config type errors (checked when the config loads)
    "config-k_max-four": (_config(top='k_max = "four"'), RUN, r"k_max must be an integer, got str 'four'"),
    "config-k_max-4.5": (_config(top="k_max = 4.5"), RUN, r"k_max must be an integer, got float 4\.5"),
    "config-n_contexts-str": (
        _config(top='n_contexts = "4"'),
        RUN,
        r"n_contexts must be an integer, got str '4' \(write n_contexts = 4, without quotes\)",
    ),
    "config-min_effect-big": (_config(test='min_effect = "big"'), RUN, r"min_effect must be a number, got str 'big'"),
    "config-alternative-bigger": (
        _config(test='alternative = "bigger"'),
        RUN,
        r"alternative must be one of greater, less, two-sided, got 'bigger'",
    ),
    "config-unknown-metric": (_config(b="random/acc"), RUN, r"condition 'random' has no metric 'acc'"),
    "config-ks-99": (_config(test="ks = [99]"), RUN, r"ks \[99\] outside 0\.\.k_max = 4"),
    # ---- output path (checked before the run)
    "out-is-a-file": ({"out": b"x"}, B, r"--out .*/out is an existing file, not a folder"),
    "out-not-empty": ({"out/old.csv": b"x"}, B, r"--out .*/out exists and is not empty; pass --overwrite"),
    "out-under-proc": ({}, _set(B, "--out", "/proc/mechicl-run"), r"--out /proc/mechicl-run is under a system folder"),
    "out-unwritable": ({}, _set(B, "--out", "ro/run"), r"cannot write to .*/ro \(permission denied\)"),
    # ---- model paths
    "model-typo-relative": ({}, _set(B, "--model", "t/typo.gguf"), r"model file not found: .*/t/typo\.gguf"),
    "model-missing-absolute": (
        {},
        _set(B, "--model", "/nonexistent/m.gguf"),
        r"model file not found: /nonexistent/m\.gguf",
    ),
    "model-random-gguf": ({"m.gguf": os.urandom(4096)}, _set(B, "--model", "m.gguf"), r"m\.gguf is not a GGUF file"),
    "model-random-safetensors": (
        {"m.safetensors": os.urandom(4096)},
        _set(B, "--model", "m.safetensors"),
        r"m\.safetensors is not a complete safetensors file \(no valid header: 4096 bytes\)",
    ),
    "model-hub-offline": (
        {},
        _set(B, "--model", "someorg/somemodel"),
        r"could not load 'someorg/somemodel' \(the Hub is unreachable: .*\)",
    ),
    "task-hf-offline": (
        {},
        _set(B, "--task", "hf:someorg/somedata"),
        r"cannot load dataset 'someorg/somedata': the Hugging Face Hub is unreachable",
    ),
    # ---- --label-names is accepted everywhere a task is (a bad value is a one-line error for each command)
    **{
        f"label-names-{cmd}": ({}, [*argv, "--label-names", "negative"], r"argument --label-names: must be two or more")
        for cmd, argv in [
            ("behavior", B),
            ("attention", ["attention", *INSIDE]),
            ("lens", ["lens", *INSIDE]),
            ("dla", ["dla", *INSIDE]),
            ("patch", PATCH),
            ("heads", HEADS),
        ]
    },
}


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(row, tmp_path, monkeypatch, capsys):
    files, argv, pattern = ROWS[row]
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    if row == "out-unwritable":  # the tests run as root, which may write anywhere: the check asks os.access
        (tmp_path / "ro").mkdir()
        real = os.access
        monkeypatch.setattr("mechicl.runs.folder.os.access", lambda p, m: real(p, m) and Path(p).name != "ro")
    if row in {"model-hub-offline", "task-hf-offline"}:  # no network, whatever this machine has
        monkeypatch.setattr("mechicl.models.loading.hub_offline", lambda: "no connection (test)")
        monkeypatch.setattr("mechicl.data.tasks.hub_offline", lambda: "no connection (test)")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _tree(tmp_path)
    t0 = time.perf_counter()
    rc = _run(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("mechicl: error: "), err
    assert re.search(pattern, err[0]), err[0]
    assert _tree(tmp_path) == before  # no run folder, no partial folder, no parent folder
    assert time.perf_counter() - t0 < 10


def _run(argv: list[str]) -> int:
    """``main``'s exit code, argparse's own exit (SystemExit 2 for a bad flag value) included."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def test_duplicate_rows_warn_in_one_line(tmp_path, monkeypatch, capsys):
    """Duplicates are a warning, not an error: the run goes on and writes a complete folder."""
    (tmp_path / "d.csv").write_text("text,label\n" + GOOD + "w1 w2,positive\n" + "w1 w2,negative\n")
    monkeypatch.chdir(tmp_path)
    assert main(_set(B, "--task", "d.csv")) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mechicl:")]
    assert err == [
        "mechicl: warning: d.csv: 1 duplicate row(s) (same text and label), e.g. line 43 repeats line 3; "
        "they are kept, so a context can show the same example twice",
        "mechicl: warning: d.csv: 1 text(s) appear with different labels, e.g. lines 3 and 42; they are kept as given",
    ]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["command"][1] == "behavior"
