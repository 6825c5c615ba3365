"""Label conditions: which label each in-context example shows (default, random, flipped, arbitrary,
mid-context switches), parsed from strings such as ``flipped`` or ``default>flipped@8``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mechicl.data.task import Task
from mechicl.errors import PromptError


@dataclass(frozen=True)
class LabelCondition:
    """Which label each in-context example shows, given its true class.

    kinds (the label map):
      ``default``    the true label;
      ``random``     labels drawn i.i.d. from the task's label marginal;
      ``flipped``    class c shows c+1 mod C (a swap for binary tasks);
      ``arbitrary``  the true class, written with replacement label words
                     (``verbalizers``, e.g. ("A", "B") or ("B", "A")).
    A mid-context change (``then``) switches from ``kind`` to ``then`` at example
    ``switch_at`` (``None``: alternate every example). ``prefix`` replaces the
    template's prefix (instructions; ``{label_0}``, ``{label_1}``, ... are filled
    with the label words). ``alias`` names the condition in results.
    """

    kind: str = "default"
    verbalizers: tuple[str, ...] | None = None
    then: str | None = None
    switch_at: int | None = None
    prefix: str | None = None
    alias: str | None = None

    KINDS = ("default", "random", "flipped", "arbitrary")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise PromptError(f"unknown label condition {self.kind!r}; use one of {', '.join(self.KINDS)}")
        if self.kind == "arbitrary" and not self.verbalizers:
            raise PromptError("the arbitrary condition needs replacement label words, e.g. 'arbitrary:A/B'")
        if self.then is not None and {self.kind, self.then} - {"default", "flipped"}:
            raise PromptError(
                f"mid-context changes switch between 'default' and 'flipped' (got {self.kind} > {self.then}); "
                f"write e.g. 'default>flipped@8' or 'default>flipped@alt'"
            )
        if self.switch_at is not None and self.switch_at < 0:
            raise PromptError(f"switch_at must be >= 0, got {self.switch_at}")

    @property
    def name(self) -> str:
        if self.alias:
            return self.alias
        if self.kind == "arbitrary":
            return f"arbitrary:{'/'.join(self.verbalizers or ())}"
        if self.then is not None:
            return f"{self.kind}>{self.then}@{'alt' if self.switch_at is None else self.switch_at}"
        return self.kind

    @classmethod
    def parse(cls, spec: str) -> LabelCondition:
        """``default`` | ``random`` | ``flipped`` | ``arbitrary`` (= A/B) | ``arbitrary:w1/w2[/...]``
        | ``default>flipped@N`` | ``flipped>default@N`` | ``default>flipped@alt``."""
        spec = spec.strip()
        if ">" in spec:
            first, _, rest = spec.partition(">")
            then, _, at = rest.partition("@")
            if not at or not (at == "alt" or at.isdigit()):
                raise PromptError(f"condition {spec!r}: write the switch point as @N (an example index) or @alt")
            return cls(first.strip(), then=then.strip(), switch_at=None if at == "alt" else int(at))
        kind, _, words = spec.partition(":")
        if kind == "arbitrary":
            return cls("arbitrary", tuple(w.strip() for w in (words or "A/B").split("/")))
        if words:
            raise PromptError(f"condition {spec!r}: only 'arbitrary' takes label words (arbitrary:w1/w2)")
        return cls(kind)

    def check_fits(self, n_examples: int) -> None:
        """A mid-context switch must happen inside a context of ``n_examples`` (else it equals its first map)."""
        if self.then is not None and self.switch_at is not None and not 1 <= self.switch_at <= n_examples - 1:
            raise PromptError(
                f"condition {self.name}: contexts hold examples 0..{n_examples - 1}, so a switch at example "
                f"{self.switch_at} {'never happens' if self.switch_at else 'is the same as ' + repr(self.then)}; "
                f"use @1..@{n_examples - 1} (or raise k_max)"
            )

    def label_words(self, task: Task) -> tuple[str, ...]:
        if self.kind != "arbitrary":
            return task.label_names
        assert self.verbalizers is not None
        if len(self.verbalizers) != task.n_classes:
            raise PromptError(
                f"{self.name} gives {len(self.verbalizers)} label words but task {task.name} "
                f"has {task.n_classes} classes {task.label_names}"
            )
        return self.verbalizers

    def map_at(self, i: int) -> str:
        """The label map in force at example ``i``."""
        if self.then is None:
            return self.kind
        if self.switch_at is None:
            return self.kind if i % 2 == 0 else self.then
        return self.kind if i < self.switch_at else self.then

    @property
    def compares_to_truth(self) -> bool:
        """Whether shown labels can differ from true ones (then results also score the truth)."""
        return self.kind in {"random", "flipped"} or self.then is not None

    def shown_labels(self, true: np.ndarray, marginal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Map true classes ``[batch, example]`` to the classes the prompt shows."""
        n_classes = len(marginal)
        out = true.copy()
        for i in range(true.shape[1]):
            kind = self.map_at(i)
            if kind == "random":
                out[:, i] = rng.choice(n_classes, size=true.shape[0], p=marginal)
            elif kind == "flipped":
                out[:, i] = (true[:, i] + 1) % n_classes
        return out

    def initial_labels(self, true: np.ndarray, n_classes: int) -> np.ndarray:
        """Labels under the map the context starts with (for mid-context changes)."""
        return (true + 1) % n_classes if self.kind == "flipped" else true.copy()


def parse_conditions(spec: str | Sequence[str]) -> list[LabelCondition]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [LabelCondition.parse(s) for s in items if s.strip()]
