"""One self-contained HTML report: sections of figures (PNG inlined as base64), tables (HTML), circuitsvis
views (inlined with ``obj.local_src``, no CDN) and captions. Drawing and assembly only; no analysis.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import circuitsvis as cv
import pandas as pd
from jaxtyping import Float
from torch import Tensor

from mechicl.data.prompts import PromptBatch
from mechicl.viz.html import LEGEND, inline_view, token_names
from mechicl.viz.table_words import words

STYLE = """body{font-family:sans-serif;margin:0;color:#222}
main{box-sizing:border-box;max-width:1040px;margin:2em auto;padding:0 20px;overflow-wrap:anywhere}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.how{font-style:italic;color:#444}
figure{margin:1.2em 0}figure img{display:block;box-sizing:border-box;width:100%;max-width:100%;height:auto;border:1px solid #eee}
figcaption,.caption{font-size:.92em;color:#333;margin-top:.4em;line-height:1.4}
.table{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0;overflow-wrap:normal}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right;vertical-align:top}
th{background:#f4f4f4}.note{background:#fff8e0;border-left:4px solid #e0b000;padding:.5em 1em}
nav a{margin-right:1em}"""


@dataclass(frozen=True)
class Figure:
    """A PNG written by the run (inlined as base64) and its caption."""

    path: Path
    caption: str


@dataclass(frozen=True)
class Table:
    df: pd.DataFrame
    caption: str
    digits: int = 2


@dataclass(frozen=True)
class View:
    """An interactive view: HTML that carries its own script (circuitsvis ``local_src``)."""

    html: str
    caption: str


@dataclass(frozen=True)
class Note:
    """A paragraph; ``pointer=True`` draws it as a highlighted box (e.g. 'this section is filled by ...')."""

    text: str
    pointer: bool = False


Block = Figure | Table | View | Note


@dataclass(frozen=True)
class Section:
    """A numbered section; ``how_to_read`` is the one line under its title that says how to read it."""

    title: str
    blocks: tuple[Block, ...]
    how_to_read: str = ""

    @property
    def anchor(self) -> str:
        return "s-" + "".join(c if c.isalnum() else "-" for c in self.title.lower()).strip("-")


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def table_html(df: pd.DataFrame, digits: int = 2) -> str:
    """``df`` in words (``table_words.words``: headers with units, CIs merged into their estimate) as HTML."""
    return words(df, digits).to_html(index=False, border=0, escape=True)


def _block(b: Block) -> str:
    cap = html.escape(getattr(b, "caption", ""))
    if isinstance(b, Figure):
        return (
            f'<figure><img alt="{html.escape(Path(b.path).name)}" src="{png_data_uri(b.path)}">'
            f"<figcaption>{cap}</figcaption></figure>"
        )
    if isinstance(b, Table):
        return f'<div class="table">{table_html(b.df, b.digits)}<p class="caption">{cap}</p></div>'
    if isinstance(b, View):
        return f'<div class="view">{b.html}<p class="caption">{cap}</p></div>'
    return f'<p class="{"note" if b.pointer else "text"}">{html.escape(b.text)}</p>'


def render_report(title: str, intro: Sequence[str], sections: Sequence[Section], path: Path) -> Path:
    """Write the page: a title, intro paragraphs, a table of contents and the numbered sections."""
    nav = " ".join(f'<a href="#{s.anchor}">{i}. {html.escape(s.title)}</a>' for i, s in enumerate(sections, 1))
    body = [f"<h1>{html.escape(title)}</h1>", *(f"<p>{html.escape(p)}</p>" for p in intro), f"<nav>{nav}</nav>"]
    for i, s in enumerate(sections, 1):
        how = [f'<p class="how">{html.escape(s.how_to_read)}</p>'] if s.how_to_read else []
        blocks = [f'<h2 id="{s.anchor}">{i}. {html.escape(s.title)}</h2>', *how, *(_block(b) for b in s.blocks)]
        body.append("<section>\n" + "\n".join(blocks) + "\n</section>")
    path.write_text(
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>\n'
        "<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n",
        encoding="utf-8",
    )
    return path


def attention_view(
    batch: PromptBatch, row: int, tokenizer: Any, patterns: Float[Tensor, "head query key"], head_names: Sequence[str]
) -> str:
    """circuitsvis ``attention_heads`` of one context with the prompt's marks ([L], [Q], « ») as inline HTML."""
    names = token_names(batch, row, tokenizer)
    n = len(names)
    view = cv.attention.attention_heads(
        attention=patterns[:, :n, :n].float().numpy(), tokens=names, attention_head_names=list(head_names)
    )
    return f"<p>{html.escape(LEGEND)}</p>\n{inline_view(view)}"
