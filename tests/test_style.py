"""ruff (lint and format), configured in pyproject.toml, is part of the suite: a violation fails `make test`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.fail("ruff is not installed: `pip install -e '.[test]'` (make test does it)")


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff_passes(args):
    run = subprocess.run(_ruff() + args, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, (
        f"ruff {' '.join(args)} failed (fix with `ruff check --fix .` / `ruff format .`):\n{run.stdout}{run.stderr}"
    )


def test_ruff_catches_a_violation(tmp_path):
    """The check can fail: an unused import and a badly formatted line are both reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx = {  'a':1 }\n")
    cfg = ["--config", str(ROOT / "pyproject.toml")]
    assert subprocess.run(_ruff() + ["check", *cfg, str(bad)], capture_output=True).returncode != 0
    assert subprocess.run(_ruff() + ["format", "--check", *cfg, str(bad)], capture_output=True).returncode != 0
