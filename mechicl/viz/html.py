"""Offline circuitsvis attention views of one context, with the prompt's structure marked.

circuitsvis's ``str(obj)`` imports its JavaScript from a CDN (blank offline); every view here is
saved from ``obj.local_src``, which inlines the bundled script, so the HTML files work offline.
Token names mark the prompt's structure (positions from the PromptBatch):
``[L]`` label token (``[L✗]`` when it shows a class other than the example's true one),
``[Q]`` readout slot, ``«`` / ``»`` first / last token of an input span, ``⏎`` newline.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

import circuitsvis as cv
from jaxtyping import Float
from torch import Tensor

from mechicl.data.prompts import BOS, PromptBatch

LEGEND = ("[L] label token ([L✗]: shows a class other than the example's true class) · "
          "[Q] readout slot (predicts the next label) · « » first / last token of an input · ⏎ newline")


def token_names(batch: PromptBatch, row: int, tokenizer: Any) -> list[str]:
    """Readable token strings of context ``row`` (unpadded) with the markers of the module docstring."""
    n = int(batch.lengths[row])
    ids = batch.tokens[row, :n].tolist()
    names = [tokenizer.decode([t]).replace("\n", "⏎") for t in ids]
    if int(batch.roles[row, 0]) == BOS:
        names[0] = "<bos>"
    for (s, e) in batch.input_spans[row].tolist():
        names[s] = "«" + names[s]
        names[e - 1] = names[e - 1] + "»"
    for j, p in enumerate(batch.label_pos[row].tolist()):
        wrong = int(batch.shown_labels[row, j]) != int(batch.true_labels[row, j])
        names[p] = ("[L✗]" if wrong else "[L]") + names[p]
    for p in batch.readout_pos[row].tolist():
        names[p] = "[Q]" + names[p]
    return names


def save_html(views: Sequence[Any], path: Path, title: str, notes: Sequence[str] = ()) -> Path:
    """Write circuitsvis views as one self-contained page (``local_src``: no external script)."""
    body = "".join(f"<p>{html.escape(n)}</p>\n" for n in notes)
    parts = "\n".join(v.local_src for v in views)
    path.write_text(
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>\n"
        f"<body style=\"font-family: sans-serif\">\n<h2>{html.escape(title)}</h2>\n{body}{parts}\n</body></html>\n",
        encoding="utf-8",
    )
    return path


def attention_heads_html(batch: PromptBatch, row: int, tokenizer: Any,
                         patterns: Float[Tensor, "head query key"], head_names: Sequence[str], path: Path,
                         title: str, notes: Sequence[str] = ()) -> Path:
    """circuitsvis ``attention_heads`` view of selected heads on one context."""
    names = token_names(batch, row, tokenizer)
    n = len(names)
    view = cv.attention.attention_heads(attention=patterns[:, :n, :n].numpy(), tokens=names,
                                        attention_head_names=list(head_names))
    return save_html([view], path, title, [LEGEND, *notes])


def readout_attention_html(batch: PromptBatch, row: int, tokenizer: Any, values: Float[Tensor, "key series"],
                           series: Sequence[str], path: Path, title: str, notes: Sequence[str] = ()) -> Path:
    """circuitsvis ``colored_tokens_multi``: each token coloured by the attention it receives (one series
    per head, e.g. from the last readout slot)."""
    names = token_names(batch, row, tokenizer)
    view = cv.tokens.colored_tokens_multi(tokens=names, values=values[: len(names)].float(), labels=list(series))
    return save_html([view], path, title, [LEGEND, *notes])
