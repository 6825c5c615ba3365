"""The findings grid checks everything before its first cell, and its cells are sealed: safe names inside --out,
keyed by their inputs' contents, verified against their manifest before reuse or a summary, one run per grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from mechicl.cli import main
from mechicl.data.tasks import load_task
from mechicl.errors import ConfigError, OutputError
from mechicl.models.registry import ORGANISMS
from mechicl.runs import findings as F
from mechicl.runs.findings_grid import grid_lock
from mechicl.runs.folder import write_manifest
from tests.runs.test_findings import CFG, QUIET

CHECKPOINTS = Path(F.__file__).parents[1] / "models" / "checkpoints"
SMALL = ["--k", "8", "--k-min", "4", "--n-screen", "4", "--n-confirm", "4", "--n-validate", "8"]
SMALL += ["--n-candidates", "3", "--n-top", "2", "--n-control", "2", "--n-resample", "1"]


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if a model is loaded or a cell runs: the input must be refused before compute."""

    def refuse(*a, **k):
        raise AssertionError("computed before the input was checked")

    monkeypatch.setattr(F, "load_model", refuse)
    monkeypatch.setattr(F, "run_cell", refuse)


def _fails(argv, capsys, *phrases):
    try:
        rc = main(["findings", *argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mechicl: error:"), err
    for phrase in phrases:
        assert phrase in err[0], err[0]
    assert "--overwrite" not in err[0]  # findings has no --overwrite flag
    return err[0]


TOML = {
    'k = "4"': ("k must be an integer >= 1", "[config]"),
    "n_boot = 0": ("n_boot must be an integer >= 1",),
    "n_resample = 0": ("n_resample must be an integer >= 1",),
    "models = 5": ("models must be a non-empty list",),
    "models = []": ("models must be a non-empty list",),
    "seeds = [-1]": ("seeds must be a non-empty list of distinct integers >= 0",),
    "task_config = 3": ("task_config must hold one table per task",),
}


@pytest.mark.parametrize("line", TOML)
def test_grid_toml_types_and_ranges_are_refused_before_any_cell(line, tmp_path, capsys, no_compute):
    top = not line.startswith(("k ", "n_"))
    (tmp_path / "g.toml").write_text(f"{line}\n" if top else f"[config]\n{line}\n")
    _fails(["--config", str(tmp_path / "g.toml"), "--out", str(tmp_path / "grid")], capsys, *TOML[line])


def test_names_out_and_engine_flags_are_refused_before_any_cell(tmp_path, capsys, no_compute):
    out = ["--out", str(tmp_path / "grid")]
    base = ["--models", "tiny", "--tasks", "toy", "--seeds", "0", *SMALL]
    _fails(["--models", "tiny", "--tasks", "toy,nosuchtask", *out], capsys, "unknown task 'nosuchtask'")
    _fails(["--models", "tiny,nosuchmodel", "--tasks", "toy", *out], capsys, "unknown model 'nosuchmodel'")
    (tmp_path / "file").write_text("x")
    _fails([*base, "--out", str(tmp_path / "file")], capsys, "is an existing file")
    _fails([*base, "--out", "/proc/x"], capsys, "under a system folder")
    _fails([*base, *out, "--slurm", "foo"], capsys, "argument --slurm: must be comma-separated key=value pairs")
    _fails([*base, *out, "--k", "200", "--k-min", "4"], capsys, "lower --k")
    _fails([*base, *out, "--summarise-only"], capsys, "none of the grid's 1 cells is finished", "--summarise-only")
    assert not (tmp_path / "grid" / "cells").exists()


def test_a_model_whose_tokenizer_cannot_read_a_task_stops_before_its_first_cell(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "run_cell", lambda *a, **k: pytest.fail("a cell ran"))
    spec = F.GridSpec(("organism-strong",), ("organism", "toy"), (0,), CFG)
    with pytest.raises(Exception, match="toy"):
        F.run_grid(spec, tmp_path, **QUIET)


# ------------------------------------------------ one real cell: a model file and a CSV task ---


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A finished one-cell grid on a copy of organism-strong's checkpoint (a model *path*, the case that wrote
    beside the model file); returns (spec, out, data folder)."""
    data = tmp_path_factory.mktemp("data")
    model = data / "models" / "x.safetensors"
    model.parent.mkdir()
    shutil.copy(CHECKPOINTS / f"{ORGANISMS['organism-strong']}.safetensors", model)
    spec = F.GridSpec((str(model),), ("organism",), (0,), CFG)
    out = data / "grid"
    F.run_grid(spec, out, **QUIET)
    return spec, out, data


def _copy(grid, tmp_path):
    spec, out, data = grid
    shutil.copytree(out, tmp_path / "grid")
    return spec, tmp_path / "grid", data


def test_a_model_path_cell_lives_inside_out_with_a_safe_name(grid):
    spec, out, data = grid
    assert sorted(p.name for p in (data / "models").iterdir()) == ["x.safetensors"]  # nothing beside the model
    (cell,) = (out / "cells").iterdir()
    assert cell.name == spec.cells()[0].slug and cell.name.startswith("x__organism__seed0__")
    assert F.finished(out) == {cell.name} and (out / "summary" / "summary.md").is_file()


def test_an_edited_task_file_or_model_file_is_another_cell(grid, tmp_path):
    spec, _, data = grid
    task = load_task("toy")
    rows = pd.DataFrame({"text": task.texts, "label": [task.label_names[y] for y in task.labels]})
    a, b = tmp_path / "a" / "d.csv", tmp_path / "b" / "d.csv"
    for p in (a, b):
        p.parent.mkdir()
        rows.to_csv(p, index=False)
    key = lambda model, task: F.GridSpec((model,), (str(task),), (0,), CFG).cells()[0].key  # noqa: E731
    assert key("tiny", a) == key("tiny", b)  # the same contents under another path: the same cell
    rows.iloc[:-1].to_csv(b, index=False)  # one row less: another task, another cell
    assert key("tiny", a) != key("tiny", b)
    model = tmp_path / "x.safetensors"
    shutil.copy(data / "models" / "x.safetensors", model)
    assert key(str(model), "organism") == spec.cells()[0].key
    with open(model, "r+b") as f:  # one weight byte changed
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert key(str(model), "organism") != spec.cells()[0].key


def test_an_edited_cell_is_refused_before_compute_and_the_old_summary_removed(grid, tmp_path, monkeypatch):
    spec, out, _ = _copy(grid, tmp_path)
    (cell,) = (out / "cells").iterdir()
    rows = (cell / "validate.csv").read_text().splitlines()
    (cell / "validate.csv").write_text("\n".join([*rows, rows[-1]]) + "\n")  # a validated head counted twice
    monkeypatch.setattr(F, "load_model", lambda *a: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError, match=r"do not match their manifest.json .*changed: validate.csv.*--rerun-damaged"):
        F.run_grid(spec, out, **QUIET)
    assert (out / "summary").is_dir()  # run_grid stopped before anything: the summary is the grid's own
    with pytest.raises(ConfigError, match=r"changed: validate.csv.*the old .*summary was removed"):
        F.summarise(out, spec)
    assert not (out / "summary").exists()


def test_rerun_damaged_reruns_only_the_damaged_cell(grid, tmp_path, monkeypatch):
    spec, out, _ = _copy(grid, tmp_path)
    (cell,) = (out / "cells").iterdir()
    original = (cell / "validate.csv").read_bytes()
    (cell / "validate.csv").write_text("garbage\n")
    said = []
    F.run_grid(spec, out, progress=False, say=said.append, rerun_damaged=True)
    assert "1 to run (1 damaged, re-run)" in said[0]
    assert (cell / "validate.csv").read_bytes() == original  # the same numbers again: the run is deterministic


@pytest.mark.parametrize("damage", ["garbage cell.json", "truncated csv", "cell.json without seed"])
@pytest.mark.parametrize("manifest", ["as written", "rewritten to match"])
def test_a_damaged_cell_file_is_a_clear_error_and_removes_the_old_summary(damage, manifest, grid, tmp_path):
    spec, out, _ = _copy(grid, tmp_path)
    (cell,) = (out / "cells").iterdir()
    if damage == "garbage cell.json":
        (cell / "cell.json").write_text("{not json")
    elif damage == "truncated csv":
        (cell / "validate.csv").write_bytes((cell / "validate.csv").read_bytes()[:40])
    else:
        meta = json.loads((cell / "cell.json").read_text())
        (cell / "cell.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "seed"}))
    if manifest == "rewritten to match":  # the damage is then seen only when the cell is read
        m = json.loads((cell / "manifest.json").read_text())
        write_manifest(cell, m["command"], m["config"], 0.0)
    what = "cannot read the finished cell" if manifest == "rewritten to match" else "do not match their manifest"
    with pytest.raises(ConfigError, match=f"{what}.*--rerun-damaged.*the old .*summary was removed"):
        F.summarise(out, spec)
    assert not (out / "summary").exists()


def test_a_second_findings_run_on_one_grid_fails_at_once(grid, tmp_path, monkeypatch, capsys):
    spec, out, _ = _copy(grid, tmp_path)
    monkeypatch.setattr(F, "load_model", lambda *a: pytest.fail("loaded a model"))
    with grid_lock(out.absolute()):
        with pytest.raises(OutputError, match="another `mechicl findings` .* is running on the grid"):
            F.run_grid(spec, out, **QUIET)
        with pytest.raises(OutputError, match="another `mechicl findings`"):
            F.summarise(out, spec)
    F.run_grid(spec, out, **QUIET)  # the lock is gone with its holder
