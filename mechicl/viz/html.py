"""Offline circuitsvis attention views of one context, with the prompt's structure marked.

circuitsvis's ``str(obj)`` imports its JavaScript from a CDN (blank offline); every view here is
saved from ``obj.local_src``, which inlines the bundled script, so the HTML files work offline.
Token names mark the prompt's structure (positions from the PromptBatch):
``[L]`` label token (``[L✗]`` when it shows a class other than the example's true one),
``[Q]`` readout slot, ``«`` / ``»`` first / last token of an input span, ``⏎`` newline.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import circuitsvis as cv
import torch
from jaxtyping import Float
from torch import Tensor

from mechicl.data.prompts import BOS, PromptBatch

LEGEND = (
    "[L] label token ([L✗]: shows a class other than the example's true class) · "
    "[Q] readout slot (predicts the next label) · « » first / last token of an input · ⏎ newline"
)


def token_names(batch: PromptBatch, row: int, tokenizer: Any) -> list[str]:
    """Readable token strings of context ``row`` (unpadded) with the markers of the module docstring."""
    n = int(batch.lengths[row])
    ids = batch.tokens[row, :n].tolist()
    names = [tokenizer.decode([t]).replace("\n", "⏎") for t in ids]
    if int(batch.roles[row, 0]) == BOS:
        names[0] = "<bos>"
    for s, e in batch.input_spans[row].tolist():
        names[s] = "«" + names[s]
        names[e - 1] = names[e - 1] + "»"
    for j, p in enumerate(batch.label_pos[row].tolist()):
        wrong = int(batch.shown_labels[row, j]) != int(batch.true_labels[row, j])
        names[p] = ("[L✗]" if wrong else "[L]") + names[p]
    for p in batch.readout_pos[row].tolist():
        names[p] = "[Q]" + names[p]
    return names


def inline_view(view: Any) -> str:
    """``view.local_src`` (circuitsvis: the bundled script, then ``CircuitsVis.render("<id>", Component, {props})``)
    with every ``<``, ``>`` and ``&`` of the props JSON written ``\\u003c`` / ``\\u003e`` / ``\\u0026``: the same strings
    to JavaScript, but a token such as ``</script>`` or ``<!--`` can no longer end the script or open a comment.
    The props start after the div's random id (which no token can predict) and end at the last ``</script>``."""
    src = view.local_src
    uid = src[src.index('id="') + 4 : src.index('"', src.index('id="') + 4)]
    start = src.index(f'"{uid}",', src.index("CircuitsVis.render("))
    end = src.rindex("</script>")
    props = src[start:end]
    for ch, code in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        props = props.replace(ch, code)
    return src[:start] + props + src[end:]


def save_html(views: Sequence[Any], path: Path, title: str, notes: Sequence[str] = ()) -> Path:
    """Write circuitsvis views as one self-contained page (``inline_view``: no external script, user text escaped)."""
    body = "".join(f"<p>{html.escape(n)}</p>\n" for n in notes)
    parts = "\n".join(inline_view(v) for v in views)
    path.write_text(
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
        f'<body style="font-family: sans-serif">\n<h2>{html.escape(title)}</h2>\n{body}{parts}\n</body></html>\n',
        encoding="utf-8",
    )
    return path


def attention_heads_html(
    batch: PromptBatch,
    row: int,
    tokenizer: Any,
    patterns: Float[Tensor, "head query key"],
    head_names: Sequence[str],
    path: Path,
    title: str,
    notes: Sequence[str] = (),
) -> Path:
    """circuitsvis ``attention_heads`` view of selected heads on one context."""
    names = token_names(batch, row, tokenizer)
    n = len(names)
    view = cv.attention.attention_heads(
        attention=patterns[:, :n, :n].numpy(), tokens=names, attention_head_names=list(head_names)
    )
    return save_html([view], path, title, [LEGEND, *notes])


def readout_attention_html(
    batch: PromptBatch,
    row: int,
    tokenizer: Any,
    values: Float[Tensor, "key series"],
    series: Sequence[str],
    path: Path,
    title: str,
    notes: Sequence[str] = (),
) -> Path:
    """circuitsvis ``colored_tokens_multi``: each token coloured by the attention it receives (one series
    per head, e.g. from the last readout slot)."""
    names = token_names(batch, row, tokenizer)
    view = cv.tokens.colored_tokens_multi(tokens=names, values=values[: len(names)].float(), labels=list(series))
    return save_html([view], path, title, [LEGEND, *notes])


def attribution_html(
    batch: PromptBatch,
    row: int,
    tokenizer: Any,
    patterns: Float[Tensor, "head query key"],
    attributions: Float[Tensor, "head query key"],
    head_names: Sequence[str],
    path: Path,
    title: str,
    notes: Sequence[str] = (),
) -> Path:
    """Raw attention beside attention attribution (AttAttr) for selected heads on one context.

    Two circuitsvis views: ``colored_tokens_multi`` of the last readout slot's row (series
    "<head> attention" and "<head> attribution", signed), and an ``attention_heads`` grid with each
    head's pattern next to its attribution divided by the head's largest |attribution| (blue
    positive, red negative, both on [-1, 1]).
    """
    names = token_names(batch, row, tokenizer)[: patterns.shape[-1]]  # up to the last readout slot (AttAttr's width)
    n, q = len(names), int(batch.readout_pos[row, -1])
    pat, att = patterns[:, :n, :n].float(), attributions[:, :n, :n].float()
    scale = att.abs().amax((1, 2), keepdim=True).clamp(min=1e-12)
    series = [f"{h} {kind}" for h in head_names for kind in ("attention", "attribution")]
    values = torch.stack([x for p, a in zip(pat[:, q], att[:, q]) for x in (p, a)], -1)  # [key, 2 * heads]
    tokens_view = cv.tokens.colored_tokens_multi(tokens=names, values=values, labels=series)
    grid = torch.stack([x for p, a in zip(pat, att / scale) for x in (p, a)])
    grid_names = [f"{h} {kind}" for h in head_names for kind in ("attention", "attribution / max|attr|")]
    grid_view = cv.attention.attention_heads(
        attention=grid.numpy(),
        tokens=names,
        attention_head_names=grid_names,
        min_value=-1.0,
        max_value=1.0,
        negative_color="red",
        positive_color="blue",
    )
    return save_html([tokens_view, grid_view], path, title, [LEGEND, *notes])
