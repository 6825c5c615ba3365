"""`mechicl aggregate` refuses a degenerate bootstrap before any compute (issue 30: --n-boot 0 gave a traceback
after all the forwards)."""

from __future__ import annotations

import pytest

from mechicl.cli import main
from mechicl.errors import ConfigError
from mechicl.runs.aggregate import AggregationConfig


@pytest.mark.parametrize("n_boot", [0, 1, 19])
def test_too_few_bootstrap_draws_are_refused_before_compute(n_boot, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"--n-boot = \d+: .*use --n-boot >= 20"):
        AggregationConfig("tiny", "toy", n_boot=n_boot)
    args = ["aggregate", "--model", "no-such-model", "--task", "toy", "--n-boot", str(n_boot)]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2  # a model that does not exist is never looked up
    assert "use --n-boot >= 20" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert AggregationConfig("tiny", "toy", n_boot=20).n_boot == 20
