"""Issue 15, the rest: atomic run folders (manifest, --overwrite, Ctrl-C at several points), the
silently-wrong numbers (Wilson intervals, one-sided verdicts, chance sentence, config.json), and a
property test: any CSV/JSONL either loads a task whose classes are exactly its label values, or
raises ``TaskError``.
"""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechicl.analysis.behavior.curves import summarize
from mechicl.analysis.stats import NOT_ENOUGH, PairedResult, decide, wilson_interval
from mechicl.cli import main
from mechicl.data.tasks import load_task
from mechicl.errors import TaskError
from mechicl.runs.behavior import _chance
from mechicl.runs.folder import MANIFEST, verify_manifest

B = ["behavior", "--model", "tiny", "--task", "toy", "--k", "2", "--n-contexts", "3"]


# ------------------------------------------------------------------ numbers ---


def test_wilson_matches_reference_values_and_stays_in_0_1():
    lo, hi = wilson_interval(np.array([5, 0, 10]), np.array([10, 10, 10]))
    assert np.allclose(lo, [0.2366, 0.0, 0.7225], atol=1e-4) and np.allclose(hi, [0.7634, 0.2775, 1.0], atol=1e-4)


def test_accuracy_ci_is_wilson_and_continuous_metrics_keep_t():
    # two contexts, one right one wrong: the t-interval was [-5.85, 6.85]
    raw = pd.DataFrame(
        {
            "condition": "c",
            "context": [0, 1, 0, 1],
            "k": 0,
            "metric": ["accuracy", "accuracy", "entropy", "entropy"],
            "value": [0.0, 1.0, 0.5, 0.7],
        }
    )
    s = summarize(raw, "m", "t").set_index("metric")
    lo, hi = wilson_interval(1, 2)
    assert (s.loc["accuracy", "ci_low"], s.loc["accuracy", "ci_high"]) == pytest.approx((float(lo), float(hi)))
    assert 0 <= s.loc["accuracy", "ci_low"] < 0.5 < s.loc["accuracy", "ci_high"] <= 1
    half = 12.706204736174698 * np.std([0.5, 0.7], ddof=1) / np.sqrt(2)  # t_{0.975, 1}
    assert s.loc["entropy", "ci_high"] == pytest.approx(0.6 + half)


def test_one_sided_no_effect_needs_the_whole_ci_inside_the_margin():
    r = PairedResult(-0.058, -0.202, 0.086, 0.8, 64)  # the CI
    assert decide(r, 0.8, 0.05, 0.1, "greater") == NOT_ENOUGH
    assert decide(PairedResult(0.0, -0.05, 0.08, 0.5, 64), 0.5, 0.05, 0.1, "greater") == "no effect (within ±0.1)"


def test_chance_sentence_counts_the_classes():
    assert _chance((10, 10)) == "0.5 is chance for this balanced binary task"
    assert _chance((7, 7, 7)) == "0.333 is chance for this balanced 3-class task"
    assert "unbalanced (6/3/1)" in _chance((6, 3, 1)) and "0.600" in _chance((6, 3, 1))


def test_config_records_stripped_label_names_and_a_complete_manifest(tmp_path, monkeypatch):
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"w{i} w{i + 1},{i % 2}\n" for i in range(20)))
    monkeypatch.chdir(tmp_path)
    assert main([*B, "--task", "d.csv", "--label-names", "negative, positive", "--out", "run"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["label_names"] == ["negative", "positive"]
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())
    assert manifest["command"][:2] == ["mechicl", "behavior"] and manifest["config"]["label_names"] == [
        "negative",
        "positive",
    ]
    assert {"torch", "transformer-lens", "python"} <= set(manifest["versions"]) and manifest["wall_time_s"] > 0
    assert "summary.md" in manifest["files"] and verify_manifest(tmp_path / "run") == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------ run folders ---


def test_overwrite_replaces_the_whole_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "accuracy_true.png").write_bytes(b"from an earlier run")
    assert main([*B, "--conditions", "default", "--out", "run"]) == 2  # not without --overwrite
    assert main([*B, "--conditions", "default", "--out", "run", "--overwrite"]) == 0
    assert not (tmp_path / "run" / "accuracy_true.png").exists() and verify_manifest(tmp_path / "run") == []


POINTS = {  # where a Ctrl-C lands, in-process: during compute, after raw.csv and summary.csv, at the manifest
    "compute": "mechicl.runs.behavior.score_batches",
    "plots": "mechicl.runs.behavior.plot_metric",
    "manifest": "mechicl.runs.folder.write_manifest",
}


@pytest.mark.parametrize("point", POINTS)
def test_ctrl_c_leaves_nothing_or_the_previous_folder(point, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*B, "--out", "prev"]) == 0
    before = (tmp_path / "prev" / MANIFEST).read_bytes()

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(POINTS[point], interrupt)
    capsys.readouterr()
    assert main([*B, "--out", "new"]) == 130
    assert main([*B, "--out", "prev", "--overwrite"]) == 130
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("mechicl:") or "Traceback" in x]
    assert err == ["mechicl: interrupted; no partial run folder was left (an earlier --out folder is unchanged)"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev"]  # no "new", no hidden partial folder
    assert (tmp_path / "prev" / MANIFEST).read_bytes() == before and verify_manifest(tmp_path / "prev") == []


def _sigint_run(out: Path, delay: float, extra: list[str]) -> tuple[int, str]:
    """Start ``mechicl behavior`` in a subprocess, SIGINT it ``delay`` s after the model has loaded."""
    cmd = [sys.executable, "-m", "mechicl.cli", *B[:-4], "--k", "16", "--n-contexts", "400", "--out", str(out), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("[mechicl] loaded"):
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.parametrize("delay", [0.0, 2.5])
def test_sigint_to_a_subprocess(delay, tmp_path):
    """A real Ctrl-C at two points (while scoring, later while writing): absent/previous, or complete."""
    prev = tmp_path / "run"
    prev.mkdir()
    (prev / "old.txt").write_text("an earlier complete run")
    rc, err = _sigint_run(prev, delay, ["--overwrite"])
    lines = [x for x in err.splitlines() if x.startswith("mechicl:") or "Traceback" in x]
    assert "Traceback" not in err
    if rc == 130:
        assert lines == ["mechicl: interrupted; no partial run folder was left (an earlier --out folder is unchanged)"]
        assert sorted(p.name for p in prev.iterdir()) == ["old.txt"]
    else:  # it finished before the signal arrived (-SIGINT: it landed after main returned)
        assert rc in (0, -signal.SIGINT) and verify_manifest(prev) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# --------------------------------------------------------- property test ---

TEXT = st.one_of(st.text(alphabet='ab ,"\n;\té', max_size=6), st.sampled_from(["w1", "w2 w3"]))
LABEL = st.one_of(st.sampled_from(["pos", "neg", " pos", "0", "1", "", "x,y"]), TEXT)


def _classes_are_the_labels(path: Path, labels: list[str]) -> None:
    try:
        task = load_task(str(path))
    except TaskError:
        return
    present = {task.label_names[y] for y in task.labels}
    assert set(task.label_names) == present  # no class without an example (no 'None' class)
    if labels is not None:
        assert present == {v.strip() for v in labels}


@pytest.mark.filterwarnings("ignore::mechicl.data.tasks.TaskWarning")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(TEXT, LABEL), max_size=8), extra=st.sampled_from(["", "w1\n", "w1,pos,x\n", '"w1']))
def test_any_csv_loads_exactly_its_labels_or_raises_task_error(rows, extra):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["text", "label"])
    w.writerows(rows)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.csv"
        path.write_text(buf.getvalue() + extra, encoding="utf-8")
        _classes_are_the_labels(path, None if extra else [lab for _, lab in rows])


VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-1, 3), st.floats(allow_nan=False), TEXT, st.lists(st.integers(), max_size=2)
)


@pytest.mark.filterwarnings("ignore::mechicl.data.tasks.TaskWarning")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    objs=st.lists(st.dictionaries(st.sampled_from(["text", "label", "x"]), VALUE, max_size=3), max_size=8),
    junk=st.sampled_from(["", "{", "[1]", "null", '"s"']),
)
def test_any_jsonl_loads_exactly_its_labels_or_raises_task_error(objs, junk):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.jsonl"
        path.write_text("\n".join([*(json.dumps(o) for o in objs), junk]), encoding="utf-8")
        labels = None if junk.strip() else [str(o.get("label")) for o in objs]
        _classes_are_the_labels(path, labels)
