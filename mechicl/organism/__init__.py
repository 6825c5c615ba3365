"""Model organisms: small transformers mechicl trains itself, with a known pre-training prior.

``load_organism("organism-strong" | "organism-weak" | path)`` returns a ``LoadedModel`` that
every analysis uses unchanged; ``mechicl.tasks.load_task("organism")`` is its task.
See ``language`` for the synthetic language and ``train`` for the recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
ORGANISMS = {"organism-strong": "strong", "organism-weak": "weak"}  # name -> checkpoint stem


def checkpoint_path(name: str) -> Path:
    return CHECKPOINT_DIR / f"{ORGANISMS[name]}.safetensors"


def load_organism(name: str) -> Any:
    """Load a shipped organism by name, or any organism checkpoint by path. Takes ~0.1 s."""
    from mechicl.organism.train import load_checkpoint

    if name in ORGANISMS:
        return load_checkpoint(checkpoint_path(name), name)
    return load_checkpoint(Path(name).expanduser())
