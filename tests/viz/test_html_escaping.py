"""User-derived text cannot run script in the HTML views (issue 30): a tokenizer whose vocabulary holds a
``</script><script>...`` token, and task texts that use it, rendered by every page writer (``attention_heads_html``,
``readout_attention_html``, ``render_report`` with ``attention_view``). The props JSON inside ``<script>`` is escaped
(``inline_view``); a headless Chromium proves the payload does not run and every view still mounts."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mechicl.data.task import Task, Template
from mechicl.data.words import VOCAB
from mechicl.viz.html import attention_heads_html, inline_view, readout_attention_html
from mechicl.viz.report_html import Section, View, attention_view, render_report
from tests import helpers
from tests.browser import CHROMIUM, check_page

PAYLOAD = "</script><script>console.error('pwned')</script><!--"


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer (whitespace only: the payload stays one token) over the tiny vocabulary + the payload."""
    vocab = {w: i for i, w in enumerate((*VOCAB, PAYLOAD))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<pad>", pad_token="<pad>", unk_token="<unk>"
    )


def _batch():
    tok = _tokenizer()
    assert tok.decode([len(VOCAB)]) == PAYLOAD  # one token, decoded whole
    texts = tuple(f"w{i} {PAYLOAD}" for i in range(8))
    task = Task("evil", texts, tuple(i % 2 for i in range(8)), ("negative", "positive"), Template())
    loaded = SimpleNamespace(tokenizer=tok, n_ctx=512, prepend_bos=True)
    b = helpers.batch(loaded, task, n_contexts=2, n_examples=3, template=Template("input : {input}\nlabel : {label}"))
    return b, tok


def _pages(tmp_path):
    b, tok = _batch()
    n = int(b.lengths[0])
    pat = torch.softmax(torch.randn(2, n, n, generator=torch.Generator().manual_seed(0)), -1)
    heads = attention_heads_html(b, 0, tok, pat, ["L0H0", "L0H1"], tmp_path / "heads.html", PAYLOAD, [PAYLOAD])
    labels = readout_attention_html(b, 0, tok, pat[:, -1].T, ["L0H0", "L0H1"], tmp_path / "labels.html", "t")
    view = View(attention_view(b, 0, tok, pat, ["L0H0", "L0H1"]), PAYLOAD)
    report = render_report(PAYLOAD, [PAYLOAD], [Section(PAYLOAD, (view,))], tmp_path / "report.html")
    return heads, labels, report


def _scripts(text: str) -> list[str]:
    return re.findall(r"<script[^>]*>(.*?)</script>", text, flags=re.S)


def test_user_text_cannot_close_the_script_or_open_a_comment(tmp_path):
    for page in _pages(tmp_path):
        text = page.read_text()
        assert text.count("</script>") == text.count("CircuitsVis.render(") >= 1  # one close per view, none of ours
        for script in _scripts(text):
            props = script[script.index("CircuitsVis.render(") :]
            assert "<!--" not in props and "</" not in props
            assert "console.error(\\u0027pwned\\u0027)" in props or "console.error('pwned')" in props
        assert "<script>console.error" not in text  # nowhere in the page, not even in titles and notes


def test_inline_view_keeps_the_props_json_equal():
    import circuitsvis as cv

    tokens = ["a", PAYLOAD, "&amp; <b>", '"q"']
    view = cv.tokens.colored_tokens(tokens=tokens, values=[0.1, 0.2, 0.3, 0.4])
    safe = inline_view(view)
    props = safe[safe.index("CircuitsVis.render(") :]
    decoded = json.loads(props[props.index("{") : props.rindex("}") + 1])  # \u003c and friends are JSON escapes
    assert decoded["tokens"] == tokens
    assert safe[: safe.index("CircuitsVis.render(")] == view.local_src[: view.local_src.index("CircuitsVis.render(")]


@pytest.mark.skipif(CHROMIUM is None, reason="headless check needs Debian's chromium package (.ci/run installs it)")
def test_a_script_token_does_not_run_in_chromium(tmp_path):
    for page in _pages(tmp_path):
        check = check_page(page, mount_wait=5.0)
        assert not any("pwned" in e for e in check.errors), (page.name, check.errors)
        assert check.errors == [], (page.name, check.errors)
        assert check.mounts and all(check.mounts), (page.name, check.mounts)  # the views still draw
        assert check.external == [], check.external
