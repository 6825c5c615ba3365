"""`mechicl heads` is one `mechicl findings` cell: the same tables byte for byte, plus the screen's maps."""

from __future__ import annotations

from mechicl.cli import main
from mechicl.runs.heads import TABLES

ORG = ["--model", "organism-strong", "--task", "organism", "--threads", "1"]
SIZES = ["--k", "8", "--k-min", "4", "--n-screen", "4", "--n-confirm", "4", "--n-candidates", "4", "--n-top", "2"]


def test_heads_writes_the_tables_of_the_same_findings_cell(tmp_path, capsys):
    """Same sizes, seed and ablation: every CSV and the summary equal the grid's cell; the preset adds the maps."""
    heads = [*SIZES[:8], "--candidates", "4", "--n-top", "2", "--n-eval", "8", "--n-control", "2"]
    assert main(["heads", *ORG, *heads, "--ablation", "zero", "--out", str(tmp_path / "h")]) == 0
    grid = ["--models", "organism-strong", "--tasks", "organism", "--seeds", "0", *SIZES, "--n-validate", "8"]
    assert main(["findings", *grid, "--n-control", "2", "--ablation", "zero", "--out", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "above matched controls" in out
    (cell,) = (tmp_path / "g" / "cells").iterdir()
    for name in [f"{t}.csv" for t in TABLES]:
        assert (tmp_path / "h" / name).read_bytes() == (cell / name).read_bytes(), name
    untimed = lambda p: [l for l in p.read_text().splitlines() if not l.startswith("Stage timings")]  # noqa: E731
    assert untimed(tmp_path / "h" / "summary.md") == untimed(cell / "summary.md")  # wall times differ run to run
    assert (tmp_path / "h" / "validate.csv").stat().st_size > 100  # the cell had an effect: not an empty table
    assert (tmp_path / "h" / "screen_effect.png").is_file() and (tmp_path / "h" / "screen_effect_est.png").is_file()
