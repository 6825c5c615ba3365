"""The findings grid: cells published atomically, finished cells skipped, a killed grid resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from mechicl.analysis.heads.finder import FindingsConfig
from mechicl.cli import main
from mechicl.errors import ConfigError
from mechicl.runs import findings as F
from tests.helpers import SMALL_GRID

CFG = FindingsConfig(
    k=8,
    k_min=4,
    n_screen=4,
    n_confirm=4,
    n_validate=8,
    n_candidates=3,
    n_top=2,
    n_control=2,
    n_resample=1,
    n_boot=200,
    n_perm=200,
)
SPEC = F.GridSpec(models=("organism-strong",), tasks=("organism",), seeds=(0, 1), config=CFG)
QUIET = dict(progress=False, say=lambda s: None)


def test_grid_writes_cells_and_summary_then_skips_finished_cells(tmp_path, monkeypatch):
    rep = F.run_grid(SPEC, tmp_path, **QUIET)
    assert F.finished(tmp_path) == {c.slug for c in SPEC.cells()}
    cell = tmp_path / "cells" / SPEC.cells()[0].slug
    meta = json.loads((cell / "cell.json").read_text())
    assert meta["seed"] == 0 and meta["stage_seeds"] == {"screen": 0, "confirm": 1, "validate": 2}
    assert {p.name for p in cell.iterdir()} >= {
        "cell.json",
        "manifest.json",
        "summary.md",
        *(f"{t}.csv" for t in F.TABLES),
    }
    assert len(rep.cells) == 2 and (tmp_path / "summary" / "summary.md").is_file()
    assert (tmp_path / "summary" / "effects_organism-strong.png").is_file()
    before = pd.read_csv(cell / "validate.csv")

    calls = []
    monkeypatch.setattr(F, "run_cell", lambda *a, **k: calls.append(a))
    F.run_grid(SPEC, tmp_path, **QUIET)
    assert calls == []  # every cell was finished
    pd.testing.assert_frame_equal(pd.read_csv(cell / "validate.csv"), before)


def test_a_killed_grid_resumes_with_the_missing_cell_only(tmp_path, monkeypatch):
    real = F.run_cell

    def dies_on_seed_1(loaded, cell, cfg, out, progress=True):
        if cell.seed == 1:
            raise KeyboardInterrupt  # as if killed while cell 2 ran
        return real(loaded, cell, cfg, out, progress)

    monkeypatch.setattr(F, "run_cell", dies_on_seed_1)
    with pytest.raises(KeyboardInterrupt):
        F.run_grid(SPEC, tmp_path, **QUIET)
    assert F.finished(tmp_path) == {SPEC.cells()[0].slug}
    assert not list((tmp_path / "cells").glob(f"{SPEC.cells()[1].slug}*"))  # nothing half-written

    ran = []
    monkeypatch.setattr(
        F, "run_cell", lambda loaded, cell, *a, **k: (ran.append(cell.seed), real(loaded, cell, *a, **k))[1]
    )
    F.run_grid(SPEC, tmp_path, **QUIET)
    assert ran == [1] and F.finished(tmp_path) == {c.slug for c in SPEC.cells()}


def test_grid_config_from_toml_with_overrides_and_clear_errors(tmp_path):
    p = tmp_path / "g.toml"
    p.write_text(
        'models = ["gemma3-270m"]\ntasks = ["vader-words", "vega-cars"]\nseeds = [0, 1, 2]\n[config]\nk = 12\n'
        "[task_config.vega-cars]\nk = 6\nk_min = 2\n"
    )
    spec = F.load_grid(p, seeds=(5,), n_top=2)
    assert spec.models == ("gemma3-270m",) and spec.seeds == (5,) and spec.config.k == 12 and spec.config.n_top == 2
    assert len(spec.cells()) == 2
    assert spec.cell_config(F.Cell("gemma3-270m", "vega-cars", 5)).k == 6 and spec.cell_config(spec.cells()[0]).k == 12
    assert spec.cell_config(spec.cells()[0]).seed == 5
    p.write_text('models = ["x"]\n[config]\nkk = 3\n')
    with pytest.raises(ConfigError, match="kk"):
        F.load_grid(p)


def test_cell_slugs_are_path_safe_and_keyed():
    assert F.Cell("m", "vader-words", 2, "abc").slug == "m__vader-words__seed2__abc"
    for model in ("/path/to/x.safetensors", "org/name", "../../up", ".hidden"):
        slug = F.Cell(model, "/data/a/reviews.csv", 0, "k").slug
        assert "/" not in slug and not slug.startswith(".")  # one plain folder name, directly under cells/
        assert (Path("/g/cells") / slug).resolve().parent == Path("/g/cells")
    keys = {c.key for c in SPEC.cells()}
    assert len(keys) == 2 and all(len(k) == 12 for k in keys)  # seeds 0 and 1: two keys


def test_cli_runs_a_grid_resumes_and_summarises(tmp_path, capsys):
    argv = [
        *SMALL_GRID,
        "--out",
        str(tmp_path / "grid"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "# Findings grid" in out and "## Head-level findings" in out and "Halawi" in out
    assert main(argv) == 0
    assert "1 already finished, 0 to run" in capsys.readouterr().out
    (cell,) = (tmp_path / "grid" / "cells").glob("organism-strong__organism__seed0__*")
    cfg = json.loads((cell / "cell.json").read_text())["config"]
    assert (cfg["k"], cfg["k_min"], cfg["n_top"], cfg["seed"]) == (8, 4, 2, 0)
    assert main([*argv, "--summarise-only"]) == 0  # the same grid: its cells are found by their keys
    capsys.readouterr()
    assert main([*argv[:-2], "--n-top", "1", "--out", str(tmp_path / "grid"), "--summarise-only"]) == 2
    assert "none of the grid's 1 cells is finished" in capsys.readouterr().err  # another configuration


def test_a_finished_cell_run_with_another_config_is_not_reused(tmp_path):
    F.run_grid(F.GridSpec(SPEC.models, SPEC.tasks, (0,), CFG), tmp_path, **QUIET)
    other = F.GridSpec(SPEC.models, SPEC.tasks, (0,), FindingsConfig(**{**CFG.__dict__, "n_top": 1}))
    said = []
    rep = F.run_grid(other, tmp_path, progress=False, say=said.append)
    assert "0 already finished, 1 to run" in said[0] and "1 finished cell(s) of other inputs" in said[0]
    assert len(F.finished(tmp_path)) == 2 and len(rep.cells) == 1  # the summary holds the asked config's cell only
    (cell,) = [tmp_path / "cells" / c.slug for c in other.cells()]
    assert json.loads((cell / "cell.json").read_text())["config"]["n_top"] == 1
