"""The task value types: ``Task`` (texts, classes, label words) and ``Template`` (how an example is written);
``check_tokenization`` stops a run whose tokenizer would turn the task into ``<unk>``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mechicl.errors import PromptError, TaskError

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
            raise TaskError(f"template example {self.example!r} must contain '{{input}}' and end with '{{label}}'")


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


def check_tokenization(task: Task, tokenizer: Any, max_texts: int = 512, max_unk: float = 0.1) -> None:
    """Stop (``PromptError``) when ``tokenizer`` loses the task's words: any ``<unk>`` in the template or
    the label words, an input that becomes no token or only ``<unk>``, or more than ``max_unk`` of the
    input tokens ``<unk>`` (checked on up to ``max_texts`` inputs, spread over the task). Cost: tokenizing them.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    fix = (
        "this model cannot read this task; use a task in its vocabulary "
        "(tiny: toy; organisms: organism) or a model with a byte-level tokenizer"
    )
    t = task.template
    for what, text in (
        ("template", t.example.replace("{input}", " ").replace("{label}", " ") + t.separator),
        ("label words", " ".join(task.label_names)),
    ):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if unk is not None and unk in ids:
            raise PromptError(
                f"the {what} of task {task.name} tokenizes to <unk>: {text.strip()!r} -> "
                f"{tokenizer.convert_ids_to_tokens(ids)}; {fix}"
            )
    idx = np.unique(np.linspace(0, len(task) - 1, min(len(task), max_texts)).round().astype(int))
    n_tok = n_unk = 0
    for i in idx:
        ids = tokenizer(task.texts[i], add_special_tokens=False).input_ids
        lost = sum(1 for x in ids if x == unk) if unk is not None else 0
        if not ids or lost == len(ids):
            raise PromptError(
                f"task {task.name}: the input {task.texts[i]!r} tokenizes to "
                f"{tokenizer.convert_ids_to_tokens(ids) or 'nothing'}; {fix}"
            )
        n_tok, n_unk = n_tok + len(ids), n_unk + lost
    if n_unk > max_unk * n_tok:
        raise PromptError(
            f"task {task.name}: {n_unk} of {n_tok} input tokens ({n_unk / n_tok:.0%}) become <unk> "
            f"with this tokenizer; {fix}"
        )
