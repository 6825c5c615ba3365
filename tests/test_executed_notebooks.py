"""The numbered notebooks execute top to bottom (nbclient, on `tiny` or a few organism steps), and their committed outputs are complete.

Each notebook's first code cell holds its parameters; the test swaps it for the tiny model's, so the
notebooks cannot rot while their committed outputs come from the real model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[test]' (nbclient, nbformat, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]' (nbclient, nbformat, ipykernel)")

ROOT = Path(__file__).parent.parent
TINY = {
    "01_quickstart": 'MODEL = "tiny"\nTASK = "toy"',
    "02_attention_to_labels": 'MODEL = "tiny"\nTASK = "toy"\nN_CONTEXTS, N_EXAMPLES, K_MIN = 3, 5, 2',
    "03_patching_correct_vs_flipped": 'MODEL = "tiny"\nTASK = "toy"\nN_CONTEXTS, N_EXAMPLES = 3, 5',
    "04_head_findings": 'MODEL = "tiny"\nTASK = "toy"\nN_EXAMPLES, N_SCREEN, N_EVAL, CANDIDATES, N_CONTROL = 5, 4, 8, 4, 2\n'
    "GRID = dict(k=8, k_min=4, n_screen=4, n_confirm=8, n_validate=8, n_candidates=4, n_boot=200, n_perm=200)",
    "05_model_organism": 'MODEL = "organism-strong"\nSTEPS, PRUNE_STEPS, N_CONTEXTS = 20, 10, 16',  # organisms are fast
}


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_every_numbered_notebook_has_tiny_parameters():
    assert sorted(p.stem for p in (ROOT / "notebooks").glob("0[1-9]_*.ipynb")) == sorted(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_committed_outputs_are_complete(name):
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    cells = _code_cells(nb)
    assert all(c.execution_count for c in cells), "run the notebook top to bottom before committing"
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"], "committed error output"
    assert any(o.output_type in ("display_data", "execute_result") for c in cells for o in c.outputs)


@pytest.mark.parametrize("name", sorted(TINY))
def test_notebook_executes_on_tiny(name):
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    first = _code_cells(nb)[0]
    assert first.source.startswith("MODEL = "), "the first code cell must hold the parameters"
    first.source = TINY[name]
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    outs = [o for c in _code_cells(nb) for o in c.outputs]
    assert not [o for o in outs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) or "text/html" in o.get("data", {}) for o in outs)
