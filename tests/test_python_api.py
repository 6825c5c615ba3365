"""docs/python-api.md runs: its ```python blocks are executed in order, in one namespace, on `tiny`."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def _blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_guide_has_code_and_uses_the_tiny_model():
    blocks = _blocks(DOC.read_text())
    assert len(blocks) >= 6
    assert 'load_model("tiny")' in blocks[0]


def test_python_api_guide_runs(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, code in enumerate(_blocks(DOC.read_text())):
        try:
            exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), ns)
        except Exception as e:  # name the block that broke
            raise AssertionError(f"docs/python-api.md block {i + 1} failed: {type(e).__name__}: {e}") from e
    out = capsys.readouterr().out
    assert "tiny" in out and "offline page: heads.html" in out
    found = ns["found"]  # the finder's cell on tiny: no in-context effect, so its checks stop before ranking
    assert found.verdict == "no in-context effect to attribute" and found.config.ablation == "interchange"
    assert not found.baseline["gap_ci_low"] > 0 and ns["res"].values.shape == (2, 4)
    assert set(ns["result"].summary.condition) == {"default", "flipped", "arbitrary:foo/bar"}
