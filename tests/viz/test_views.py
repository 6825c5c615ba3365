"""Offline HTML views, token markers, plots, and the attention / lens / dla commands on the tiny model."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch

from mechicl.analysis.inside.attention import context_patterns
from mechicl.cli import main
from mechicl.runs.markdown import md_table
from mechicl.viz import html, plots
from tests import helpers

EXTERNAL = re.compile(
    r"""(<script[^>]*\bsrc\s*=|\bimport\b[^;"']*\bfrom\s*["']https?:|\bimport\s*\(\s*["']https?:|unpkg\.com|cdn\.jsdelivr)""",
    re.I,
)


def _no_external_script(text: str) -> None:
    hit = EXTERNAL.search(text)
    assert hit is None, f"external script reference: {text[max(0, hit.start() - 80) : hit.end() + 80]!r}"
    assert "CircuitsVis.render(" in text  # the inlined bundle renders the view


def test_external_script_detector_catches_the_cdn_version(tiny, toy):
    import circuitsvis as cv

    obj = cv.attention.attention_heads(attention=torch.rand(1, 3, 3), tokens=["a", "b", "c"])
    assert EXTERNAL.search(str(obj)), "str() is the CDN version and must be flagged"
    assert EXTERNAL.search('<script src="https://x.org/a.js"></script>')


def test_token_names_mark_labels_inputs_and_slots(tiny, toy):
    b = helpers.batch(tiny, toy, "flipped", n_contexts=1, n_examples=3)
    names = html.token_names(b, 0, tiny.tokenizer)
    assert len(names) == int(b.lengths[0]) and names[0] == "<bos>"
    for j in range(3):
        p = int(b.label_pos[0, j])
        assert names[p].startswith("[L✗]") and names[p].endswith(b.label_words[int(b.shown_labels[0, j])])
        assert names[p - 1].startswith("[Q]")
        s, e = b.input_spans[0, j].tolist()
        assert names[s].startswith("«") and names[e - 1].endswith("»")


def test_html_views_are_self_contained(tiny, toy, tmp_path):
    b = helpers.batch(tiny, toy, n_contexts=2, n_examples=4)
    heads = [(0, 1), (1, 2)]
    pat = context_patterns(tiny.model, b, 1, heads)
    n = int(b.lengths[1])
    assert pat.shape == (2, n, n)
    torch.testing.assert_close(pat.sum(-1), torch.ones(2, n))
    p1 = html.attention_heads_html(b, 1, tiny.tokenizer, pat, ["L0H1", "L1H2"], tmp_path / "a.html", "heads")
    p2 = html.readout_attention_html(
        b, 1, tiny.tokenizer, pat[:, int(b.readout_pos[1, -1])].T, ["L0H1", "L1H2"], tmp_path / "b.html", "tokens"
    )
    for p in (p1, p2):
        text = p.read_text(encoding="utf-8")
        _no_external_script(text)
        assert "[L]" in text and "[Q]" in text and "«" in text


def test_heatmap_and_line_plot_write_pngs(tmp_path):
    df = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "v": [0.1, -0.2, 0.3, 0.0]})
    assert plots.heatmap(plots.head_grid(df, "v"), tmp_path / "h.png", "t").read_bytes()[:4] == b"\x89PNG"
    line = pd.DataFrame({"x": [0, 1, 0, 1], "y": [1.0, 2.0, 0.5, 0.2], "s": ["a", "a", "b", "b"], "lo": 0.0, "hi": 3.0})
    assert (
        plots.line_plot(line, "x", "y", tmp_path / "l.png", hue="s", band=("lo", "hi"), vline=1).stat().st_size > 1000
    )


def test_md_table():
    t = md_table(pd.DataFrame({"a": ["x"], "b": [0.12345]}), digits=2)
    assert t.splitlines() == ["| a | b |", "|---|---|", "| x | 0.12 |"]


COMMON = ["--model", "tiny", "--task", "toy", "--n-contexts", "3", "--k", "4", "--k-min", "2"]


def test_attention_command(tmp_path, capsys):
    out = tmp_path / "att"
    assert main(["attention", *COMMON, "--top", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Top 3 heads by attention to earlier label tokens" in printed and "L1H" in printed
    for name in [
        "label_attention.csv",
        "label_attention_by_distance.csv",
        "pm.csv",
        "induction.csv",
        "heads.csv",
        "saliency_layers.csv",
        "saliency_heads.csv",
        "label_attention_default.png",
        "pm_flipped.png",
        "induction.png",
        "saliency_layers.png",
        "label_attention_distance.png",
        "summary.md",
        "config.json",
    ]:
        assert (out / name).stat().st_size > 0, name
    for name in ["attention_heads_default.html", "attention_heads_flipped.html", "attention_to_labels.html"]:
        _no_external_script((out / name).read_text(encoding="utf-8"))
    heads = pd.read_csv(out / "heads.csv")
    assert len(heads) == 8 and heads.label_attention.between(0, 1).all()


def test_lens_and_dla_commands(tmp_path, capsys):
    assert main(["lens", *COMMON, "--out", str(tmp_path / "lens")]) == 0
    text = capsys.readouterr().out
    assert "critical layer" in text.lower() and "| depth |" in text
    s = pd.read_csv(tmp_path / "lens" / "lens_summary.csv")
    assert set(s.condition) == {"default", "flipped"} and s.depth.max() == 2
    assert main(["dla", *COMMON, "--out", str(tmp_path / "dla")]) == 0
    text = capsys.readouterr().out
    assert "Most on the context side" in text and "Most on the prior side" in text
    pvc = pd.read_csv(tmp_path / "dla" / "prior_vs_context.csv")
    assert {"context", "prior", "side"} <= set(pvc.columns) and (pvc.kind == "head").sum() == 8
    dla = pd.read_csv(tmp_path / "dla" / "dla.csv")
    for (_cond, _dec), g in dla.groupby(["condition", "decomposition"]):
        assert g[g.kind != "total"].dla.sum() == pytest.approx(g[g.kind == "total"].dla.iloc[0], abs=1e-4)


def test_bad_k_min_exits_2(capsys):
    assert main(["lens", "--model", "tiny", "--task", "toy", "--k", "3", "--k-min", "4"]) == 2
    assert "--k-min" in capsys.readouterr().err
