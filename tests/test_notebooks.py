"""The quickstart notebook's code runs (on the tiny model, to stay fast)."""

from __future__ import annotations

import json
from pathlib import Path

NB = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_on_tiny_model():
    cells = [c for c in json.loads(NB.read_text())["cells"] if c["cell_type"] == "code"]
    code = "\n".join("".join(c["source"]) for c in cells)
    code = code.replace("load_model(DEFAULT_MODEL)", 'load_model("tiny")').replace('load_task("vader-words")', 'load_task("toy")')
    namespace: dict = {}
    exec(compile(code, str(NB), "exec"), namespace)  # noqa: S102 - runs our own notebook
    assert namespace["result"].summary.k.max() == 8
