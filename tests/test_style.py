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


def undefined_names(paths: list[str], cwd: Path = ROOT) -> list[str]:
    """ruff's F821 (undefined name), less the jaxtyping shape strings it misreads ("batch", "n layer"): a report is
    kept unless its name appears inside a quoted string on its own line. pyproject turns F821 off for those
    strings; this brings the check back for real names (a missing import once reached a user as a NameError)."""
    import json as _json

    run = subprocess.run(
        _ruff() + ["check", "--select", "F821", "--output-format", "json", "--exit-zero", *paths],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    out = []
    for v in _json.loads(run.stdout or "[]"):
        name = v["message"].split("`")[1] if "`" in v["message"] else ""
        line = Path(v["filename"]).read_text().splitlines()[v["location"]["row"] - 1]
        quoted = [part for i, part in enumerate(line.replace("'", '"').split('"')) if i % 2 == 1]
        if not any(name in q.split() for q in quoted):
            out.append(f"{v['filename']}:{v['location']['row']}: {v['message']}")
    return out


def test_no_undefined_names():
    bad = undefined_names(["mechicl", "benchmarks", "scripts", "tests"])
    assert not bad, "undefined names:\n" + "\n".join(bad)


def test_undefined_names_are_caught_and_shape_strings_are_not(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        'from jaxtyping import Float\nimport numpy as np\n\n\ndef f(x: Float[np.ndarray, "batch"]) -> None:\n'
        "    return key_values(x)\n"
    )
    got = undefined_names([str(src)], cwd=tmp_path)
    assert len(got) == 1 and "key_values" in got[0]
