"""The PromptBatch: tokens plus every position an analysis needs (label conditions: ``data.conditions``).

A context is ``prefix`` followed by ``n_examples`` examples joined by the
template separator. Example ``i`` has an input span, one label token, and a
*readout slot*: the position right before the label token, whose next-token
prediction is that label. The prediction at readout slot ``i`` has seen ``i``
labelled examples, so one forward gives the curve for k = 0 .. n_examples-1.

Positions are found from the tokenizer's character offsets of the rendered
text, so they are exact for the tokenization the model really sees; a label
word that is not exactly one token in context raises ``LabelTokenError``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from mechicl.data.conditions import LabelCondition
from mechicl.data.task import Task, Template
from mechicl.errors import ContextOverflowError, LabelTokenError, PromptError

# Position roles, stored per token in PromptBatch.roles.
PAD, BOS, TEMPLATE, INPUT, LABEL = 0, 1, 2, 3, 4
ROLE_NAMES = ("pad", "bos", "template", "input", "label")


# ----------------------------------------------------------- PromptBatch ---


@dataclass(frozen=True)
class PromptBatch:
    """Tokens of ``batch`` contexts with ``example`` labelled examples each, and all positions.

    Right-padded; padding never changes the numbers at real positions of a causal model.
    Memory: a few int64 tensors of size batch x pos.
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    roles: Int[Tensor, "batch pos"]  # PAD/BOS/TEMPLATE/INPUT/LABEL per token
    input_spans: Int[Tensor, "batch example 2"]  # [start, end) token positions of each input
    label_pos: Int[Tensor, "batch example"]  # position of each label token
    readout_pos: Int[Tensor, "batch example"]  # label_pos - 1: predicts that label
    true_labels: Int[Tensor, "batch example"]  # task class of each example
    shown_labels: Int[Tensor, "batch example"]  # class whose word the prompt shows
    example_ids: Int[Tensor, "batch example"]  # row in task.texts
    label_token_ids: Int[Tensor, "n_labels"]  # token of each class's label word (condition's words)
    label_words: tuple[str, ...]
    condition: str
    task: str
    texts: tuple[str, ...] = field(repr=False)  # the rendered contexts
    label_condition: LabelCondition | None = field(default=None, repr=False)
    initial_labels: Int[Tensor, "batch example"] | None = field(default=None, repr=False)  # under the first map
    label_token_seqs: tuple[tuple[int, ...], ...] | None = None  # set only when some label has > 1 token

    @property
    def n_contexts(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_examples(self) -> int:
        return int(self.label_pos.shape[1])

    @property
    def lengths(self) -> Int[Tensor, "batch"]:
        return self.attention_mask.sum(-1)

    def select(self, idx: slice | Sequence[int]) -> PromptBatch:
        """Sub-batch of contexts, trimmed to its longest context."""
        rows = list(range(self.n_contexts))[idx] if isinstance(idx, slice) else list(idx)
        width = int(self.attention_mask[rows].sum(-1).max())
        t = lambda x: x[rows]  # noqa: E731
        return PromptBatch(
            tokens=self.tokens[rows, :width],
            attention_mask=self.attention_mask[rows, :width],
            roles=self.roles[rows, :width],
            input_spans=t(self.input_spans),
            label_pos=t(self.label_pos),
            readout_pos=t(self.readout_pos),
            true_labels=t(self.true_labels),
            shown_labels=t(self.shown_labels),
            example_ids=t(self.example_ids),
            label_token_ids=self.label_token_ids,
            label_words=self.label_words,
            condition=self.condition,
            task=self.task,
            texts=tuple(self.texts[i] for i in rows),
            label_condition=self.label_condition,
            initial_labels=None if self.initial_labels is None else t(self.initial_labels),
            label_token_seqs=self.label_token_seqs,
        )


def sample_contexts(task: Task, n_contexts: int, n_examples: int, seed: int = 0) -> Int[Tensor, "batch example"]:
    """Draw ``n_examples`` distinct task rows for each of ``n_contexts`` contexts (seeded)."""
    if n_examples > len(task):
        raise PromptError(f"n_examples={n_examples} exceeds the {len(task)} examples of task {task.name}")
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(len(task), size=n_examples, replace=False) for _ in range(n_contexts)])
    return torch.as_tensor(ids, dtype=torch.long)


def _render(
    template: Template, pairs: Sequence[tuple[str, str]]
) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """Text plus char spans of every input and label."""
    before, _, after = template.example.partition("{input}")
    after = after[: -len("{label}")]
    text, in_spans, lab_spans = template.prefix, [], []
    for i, (x, y) in enumerate(pairs):
        if i:
            text += template.separator
        text += before
        in_spans.append((len(text), len(text) + len(x)))
        text += x + after
        lab_spans.append((len(text), len(text) + len(y)))
        text += y
    return text, in_spans, lab_spans


def _show(tokenizer: Any, ids: Sequence[int], offsets: Sequence[tuple[int, int]], text: str, around: int) -> str:
    lo, hi = max(0, around - 6), min(len(ids), around + 3)
    return " ".join(f"[{p}]{text[s:e]!r}" for p, (s, e) in zip(range(lo, hi), offsets[lo:hi]))


def _encode(tokenizer: Any, text: str, prepend_bos: bool) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if prepend_bos:
        ids, offs = [tokenizer.bos_token_id, *ids], [(0, 0), *offs]
    return ids, offs


def _locate(text, ids, offs, in_spans, lab_spans, words, tokenizer, multi_token: bool = False):
    """Token spans of each input and label from char offsets.

    A label must be covered exactly by its tokens (one token unless ``multi_token``).
    Returns ([(in_start, in_end)], [(label_start, label_end)]).
    """
    inputs, labels = [], []
    for (i0, i1), (l0, l1), word in zip(in_spans, lab_spans, words):
        hit = [p for p, (s, e) in enumerate(offs) if s < l1 and e > l0 and e > s]
        # the first label token may absorb the whitespace right before the word (" positive")
        ws = len(text[:l0]) - len(text[:l0].rstrip())
        exact = bool(hit) and offs[hit[0]][0] >= l0 - ws and offs[hit[-1]][1] == l1
        if not exact or (len(hit) != 1 and not multi_token):
            near = hit[0] if hit else next((p for p, (s, _) in enumerate(offs) if s >= l0), len(ids) - 1)
            what = "is not exactly one token" if exact or not multi_token else "does not align with token boundaries"
            raise LabelTokenError(
                f"label word {word!r} {what} in its template context; the tokens around it are: "
                f"{_show(tokenizer, ids, offs, text, near)}. Fix: choose label words that are single tokens "
                f"after the template's separator (e.g. ' positive'), change the template so the word is not "
                f"merged with its neighbours, or allow multi-token labels (multi_token=True / --multi-token), "
                f"which scores whole label sequences at a higher cost."
            )
        span = [p for p, (s, e) in enumerate(offs) if s < i1 and e > i0 and e > s]
        if not span:
            raise PromptError(f"an input produced no tokens in context: {text[i0:i1]!r}")
        inputs.append((span[0], span[-1] + 1))
        labels.append((hit[0], hit[-1] + 1))
    return inputs, labels


def label_token_sequences(
    tokenizer: Any, template: Template, words: Sequence[str], prepend_bos: bool, multi_token: bool = False
) -> list[tuple[int, ...]]:
    """The token ids of each label word as it appears at the end of an example of ``template``."""
    seqs = []
    for w in words:
        text, ins, labs = _render(Template(template.example, template.separator, ""), [("x", w)])
        ids, offs = _encode(tokenizer, text, prepend_bos)
        _, spans = _locate(text, ids, offs, ins, labs, [w], tokenizer, multi_token)
        seqs.append(tuple(ids[spans[0][0] : spans[0][1]]))
    if len(set(seqs)) != len(seqs) or (not multi_token and len({q[0] for q in seqs}) != len(seqs)):
        raise LabelTokenError(
            f"label words {list(words)} map to token ids {[list(q) for q in seqs]}; two classes share a token "
            f"(often the tokenizer's unknown token). Choose distinct words the tokenizer knows."
        )
    return seqs


def label_token_ids(tokenizer: Any, template: Template, words: Sequence[str], prepend_bos: bool) -> list[int]:
    """The single token id of each label word in ``template`` context (LabelTokenError otherwise)."""
    return [q[0] for q in label_token_sequences(tokenizer, template, words, prepend_bos)]


def _draw_shown(task: Task, cond: LabelCondition, true: np.ndarray, seed: int) -> np.ndarray:
    """The condition's shown labels, from a generator seeded by ``seed`` and the condition's name."""
    marginal = np.bincount(np.asarray(task.labels), minlength=task.n_classes) / len(task)
    tag = int.from_bytes(hashlib.sha256(f"{seed}:{cond.name}".encode()).digest()[:4], "little")
    return cond.shown_labels(true, marginal, np.random.default_rng(tag))


_Row = tuple[list[int], list[tuple[int, int]], list[tuple[int, int]], str]  # ids, input spans, label spans, text


def _tokenize_context(
    task: Task,
    tokenizer: Any,
    template: Template,
    words: Sequence[str],
    seqs: Sequence[tuple[int, ...]],
    ex: np.ndarray,
    shown: np.ndarray,
    b: int,
    *,
    n_ctx: int,
    prepend_bos: bool,
    multi_token: bool,
) -> _Row:
    """Render context ``b`` and tokenize it; its input and label token spans, checked against the label sequences."""
    pairs = [(task.texts[j], words[s]) for j, s in zip(ex, shown)]
    text, ins, labs = _render(template, pairs)
    ids, offs = _encode(tokenizer, text, prepend_bos)
    if len(ids) > n_ctx:
        raise ContextOverflowError(
            f"context {b} is {len(ids)} tokens but the model's n_ctx is {n_ctx}. Nothing is truncated. "
            f"Fix: use fewer in-context examples (now {len(ex)}) or a task with shorter inputs."
        )
    in_pos, lab_spans = _locate(text, ids, offs, ins, labs, [p[1] for p in pairs], tokenizer, multi_token)
    for (p, e), s in zip(lab_spans, shown):
        if tuple(ids[p:e]) != seqs[s]:
            raise LabelTokenError(
                f"label {words[s]!r} tokenizes to {ids[p:e]} in context {b} but to {list(seqs[s])} "
                f"in isolation: {_show(tokenizer, ids, offs, text, p)}. Change the template separator."
            )
    return ids, in_pos, lab_spans, text


def _assemble(rows: Sequence[_Row], k: int, pad_id: int | None, prepend_bos: bool) -> tuple[Tensor, ...]:
    """Right-padded tokens, mask and roles ``[n, width]``, input spans ``[n, k, 2]`` and label positions ``[n, k]``."""
    n, width = len(rows), max(len(r[0]) for r in rows)
    tokens = torch.full((n, width), pad_id if pad_id is not None else 0)
    mask = torch.zeros(n, width, dtype=torch.long)
    roles = torch.full((n, width), PAD, dtype=torch.long)
    spans = torch.zeros(n, k, 2, dtype=torch.long)
    lpos = torch.zeros(n, k, dtype=torch.long)
    for b, (ids, in_pos, lab_pos, _) in enumerate(rows):
        tokens[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
        roles[b, : len(ids)] = TEMPLATE
        if prepend_bos:
            roles[b, 0] = BOS
        for i, ((s, e), (p, q)) in enumerate(zip(in_pos, lab_pos)):
            roles[b, s:e] = INPUT
            roles[b, p:q] = LABEL
            spans[b, i] = torch.tensor([s, e])
            lpos[b, i] = p
    return tokens, mask, roles, spans, lpos


def _condition_template(cond: LabelCondition, template: Template, words: Sequence[str]) -> Template:
    """The template a condition renders with: its instruction prefix (if any) with the label words filled in."""
    if cond.prefix is None:
        return template
    prefix = cond.prefix
    for i, w in enumerate(words):
        prefix = prefix.replace(f"{{label_{i}}}", w)
    return Template(template.example, template.separator, prefix)


def build_prompt_batch(
    task: Task,
    tokenizer: Any,
    example_ids: Int[Tensor, "batch example"],
    condition: LabelCondition | str = "default",
    *,
    n_ctx: int,
    prepend_bos: bool,
    template: Template | None = None,
    seed: int = 0,
    shown_labels: Int[Tensor, "batch example"] | None = None,
    multi_token: bool = False,
) -> PromptBatch:
    """Render and tokenize contexts of ``task`` rows ``example_ids`` under ``condition``.

    ``shown_labels`` overrides the condition's label draw (for custom schedules).
    ``multi_token`` allows label words of several tokens: ``label_pos`` is then the
    first label token, every label token gets the LABEL role, and
    ``label_token_seqs`` holds each class's full sequence.
    Random labels use a generator seeded by ``seed`` and the condition name, so the
    same seed gives the same labels. Raises LabelTokenError / ContextOverflowError.
    """
    cond = LabelCondition.parse(condition) if isinstance(condition, str) else condition
    words = cond.label_words(task)
    template = _condition_template(cond, template or task.template, words)
    seqs = label_token_sequences(tokenizer, template, words, prepend_bos, multi_token)
    word_ids = [q[0] for q in seqs]
    ex = example_ids.numpy()
    true = np.asarray(task.labels)[ex]
    shown = _draw_shown(task, cond, true, seed) if shown_labels is None else shown_labels.numpy()

    context = partial(_tokenize_context, task, tokenizer, template, words, seqs, n_ctx=n_ctx, prepend_bos=prepend_bos)
    rows = [context(ex[b], shown[b], b, multi_token=multi_token) for b in range(ex.shape[0])]
    tokens, mask, roles, spans, lpos = _assemble(rows, ex.shape[1], tokenizer.pad_token_id, prepend_bos)
    return PromptBatch(
        tokens=tokens,
        attention_mask=mask,
        roles=roles,
        input_spans=spans,
        label_pos=lpos,
        readout_pos=lpos - 1,
        true_labels=torch.as_tensor(true, dtype=torch.long),
        shown_labels=torch.as_tensor(shown, dtype=torch.long),
        example_ids=example_ids.clone(),
        label_token_ids=torch.tensor(word_ids),
        label_words=tuple(words),
        condition=cond.name,
        task=task.name,
        texts=tuple(r[3] for r in rows),
        label_condition=cond,
        initial_labels=torch.as_tensor(cond.initial_labels(true, task.n_classes), dtype=torch.long),
        label_token_seqs=tuple(seqs) if any(len(q) > 1 for q in seqs) else None,
    )
