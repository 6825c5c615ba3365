"""`mechicl aggregate` refuses values that used to fail after compute (or gave NaN tables) with one argparse line."""

from __future__ import annotations

import pytest

from mechicl.cli import main

BASE = ["aggregate", "--model", "tiny", "--task", "toy", "--n-select", "4", "--n-fit", "8", "--n-eval", "8"]


@pytest.mark.parametrize(
    "extra, phrase",
    [
        (["--k", "1"], "argument --k: must be an integer >= 2, got 1"),
        (
            ["--heads", "L0H0,L0H0"],
            "argument --heads: must name each head once, e.g. L1H1,L0H2; got 'L0H0,L0H0' (L0H0 twice)",
        ),
        (["--heads", "L0X0"], "argument --heads:"),
        (["--alphas", "nan,inf"], "argument --alphas: must be finite numbers (no nan or inf)"),
        (["--alphas", "0,1e999"], "argument --alphas: must be finite numbers"),
    ],
)
def test_bad_values_are_one_line_before_anything_loads(extra, phrase, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*BASE, *extra, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and phrase in err[0], err
    assert not (tmp_path / "o").exists()


def test_the_smallest_k_and_distinct_heads_run(tmp_path, capsys):
    out = tmp_path / "o"
    argv = [*BASE, "--k", "2", "--heads", "L0H0,L1H1", "--n-boot", "20", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    assert (out / "manifest.json").is_file()
