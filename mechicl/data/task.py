"""The task value types: ``Task`` (texts, classes, label words) and ``Template`` (how an example is written)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mechicl.errors import TaskError

SENTIMENT = ("negative", "positive")


@dataclass(frozen=True)
class Template:
    """How one example is written: ``prefix + sep.join(example.format(input=, label=)) ``.

    ``{label}`` must come last in ``example`` so that the label is the token the
    model predicts at the end of each example. ``prefix`` is free text
    (instructions) placed before the first example.
    """

    example: str = "Input: {input}\nLabel: {label}"
    separator: str = "\n\n"
    prefix: str = ""

    def __post_init__(self) -> None:
        if "{input}" not in self.example or not self.example.endswith("{label}"):
            raise TaskError(
                f"template example {self.example!r} must contain '{{input}}' and end with '{{label}}'"
            )


@dataclass(frozen=True)
class Task:
    """Texts with integer classes and the label word for each class."""

    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    template: Template = field(default_factory=Template)
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise TaskError(f"task {self.name}: {len(self.texts)} texts but {len(self.labels)} labels")
        if len(self.label_names) < 2:
            raise TaskError(f"task {self.name}: needs at least two classes, got {self.label_names}")
        bad = sorted({y for y in self.labels if not 0 <= y < len(self.label_names)})
        if bad:
            raise TaskError(f"task {self.name}: label indices {bad} outside 0..{len(self.label_names) - 1}")

    @property
    def n_classes(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self) -> list[int]:
        return np.bincount(np.asarray(self.labels), minlength=self.n_classes).tolist()
