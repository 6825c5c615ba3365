"""`mechicl report` on organism-strong: one offline page with every section, inline images, captions whose
numbers are the run's own CSVs, and the same numbers as the separate commands on the same seeds."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mechicl.cli import main
from mechicl.runs.report_data import ReportConfig, arbitrary_words
from mechicl.viz.report_html import Figure, Note, Section, Table, render_report
from mechicl.viz.table_words import NBSP
from tests.browser import CHROMIUM, check_page
from tests.viz.test_views import EXTERNAL, _no_external_script

SECTIONS = [
    "Headline",
    "Behaviour",
    "Where the flip happens",
    "Who looks at labels",
    "Who carries the label information causally",
    "Validation",
    "Prior vs context",
    "Circuit and findings",
    "Run facts",
]
ORG = ["--model", "organism-strong", "--task", "organism", "--arbitrary", "a/b", "--seed", "0"]
Q = ReportConfig.sized("quick", model="organism-strong", task="organism")  # the sizes --quick uses


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report")
    assert main(["report", *ORG, "--quick", "--out", str(out)]) == 0
    return out, (out / "report.html").read_text(encoding="utf-8")


def _captions(html: str) -> str:
    return " ".join(re.findall(r"<(?:figcaption|p)[^>]*>(.*?)</(?:figcaption|p)>", html, re.S))


def test_report_is_one_offline_page_with_every_section(report):
    out, html = report
    _no_external_script(html)
    assert not re.search(r"""\b(src|href)\s*=\s*["']?\s*https?:""", html, re.I)
    heads = re.findall(r"<h2[^>]*>(\d+)\. ([^<]+)</h2>", html)
    assert [t for _, t in heads] == SECTIONS and [int(i) for i, _ in heads] == list(range(1, 10))
    imgs = re.findall(r"<img[^>]*\bsrc=\"([^\"]*)\"", html)
    assert len(imgs) >= 12 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert html.count("CircuitsVis.render(") == 1 and "[Q]" in html and "[L]" in html
    assert "Raw attention vs attribution on label tokens" in html  # AttAttr is on by default
    assert "Held-out path patching among the headline heads" in html  # section 8 is filled without flags
    assert "mechicl findings --models organism-strong" in html  # no committed grid cell: it names the command
    assert "mechicl report --model organism-strong --task organism --seed 0 --arbitrary a/b --quick" in html
    assert "The committed grid has no cell of organism-strong" in html  # the headline says where replication is


def test_every_mechanism_section_is_read_against_the_headline(report):
    """Attention, patching, validation and prior each open with a line naming the headline heads (the validated
    heads above their controls) and quoting their values from that section's own CSVs; the circuit section is built
    from those heads."""
    out, html = report
    v = pd.read_csv(out / "validate.csv")
    named = list(v.heads[v.above_control])
    lines = re.findall(r"Against the headline \(([^)]*)\): (.*?)</p>", html, re.S)
    assert len(lines) == 4 and all(n.split(", ") == named for n, _ in lines)
    sec8 = html[html.rindex("8. Circuit and findings") : html.rindex("9. Run facts")]
    order = sorted(named, key=lambda h: tuple(map(int, h[1:].split("H"))))
    assert f"Held-out path patching among the headline heads ({', '.join(order)})" in sec8
    att = pd.read_csv(out / "attention_heads.csv")
    att["name"] = [f"L{l}H{h}" for l, h in zip(att.layer, att["head"])]
    for h in named:
        share = float(att.set_index("name").label_attention[h])
        assert f"{h} {share:.2f} (rank" in lines[0][1]
    patched = pd.read_csv(out / "head_out_denoise.csv")
    patched["name"] = [f"L{l}H{h}" for l, h in zip(patched.layer, patched["head"])]
    for h in named:
        assert f"{h} {float(patched.set_index('name').effect[h]):+.2f} (rank" in lines[1][1]


def test_captions_quote_the_runs_csvs(report):
    out, html = report
    text = _captions(html)
    s = pd.read_csv(out / "behavior_summary.csv")
    d = s[(s.condition == "flipped") & (s.metric == "accuracy") & (s.k == Q.k_max)].iloc[0]
    assert f"flipped {d['mean']:.2f} [{d.ci_low:.2f}, {d.ci_high:.2f}]" in text
    gap = pd.read_csv(out / "lens_gap.csv").query("metric == 'accuracy_true'")
    best = gap.loc[gap["mean"].idxmax()]
    assert (
        f"The largest gap is {best['mean']:.2f} [{best.ci_low:.2f}, {best.ci_high:.2f}] at depth {int(best.depth)}"
        in text
    )
    att = pd.read_csv(out / "attention_heads.csv").sort_values("label_attention", ascending=False).iloc[0]
    assert f"L{int(att.layer)}H{int(att['head'])} puts {att.label_attention:.2f} of its readout attention" in text
    a = pd.read_csv(out / "attribution_vs_exact.csv")
    assert f"Spearman {stats.spearmanr(a.attribution, a.exact).statistic:.2f}" in text
    v = pd.read_csv(out / "validate.csv").iloc[0]  # the head finder's cell (`mechicl heads`)
    head_row = f"<td>{v.heads}</td><td>{v.role}</td><td>{v.interchange:+.2f} [{v.interchange_ci_low:+.2f}, "
    assert head_row in re.sub(r">\s+<", "><", html).replace(NBSP, " ")  # the headline reads the same cell
    assert f"Ablating {v.heads} closes {v.effect:+.2f} [{v.effect_ci_low:+.2f}, {v.effect_ci_high:+.2f}]" in text
    assert f"close {v.control_mean:+.2f} on average" in text and f"({v.controls}: same layer" in text
    assert f"readout slots k = {Q.k_min}..{Q.n_examples - 1}" in text and f"{Q.n_eval} (validate)" in text
    st = pd.read_csv(out / "stages.csv")
    assert f"{int(st.forwards.sum())} over {int(st.rows.sum())} context rows" in html
    f = st.set_index("stage").forwards  # one shared run per condition feeds attention, lens, DLA, patching caches
    assert f["shared runs"] == 2 and f["logit lens"] == 0 and f["figures + views"] == 0
    assert f["DLA + prior vs context"] == -(-Q.n_inside * Q.n_examples // 32)  # only the zero-shot queries run
    g = pd.read_csv(out / "attattr_groups.csv").query("group == 'label' and condition == 'flipped'")
    top = g.loc[g.attribution.abs().idxmax()]
    assert f"L{int(top.layer)}H{int(top['head'])} carries the most (|AttAttr| {abs(top.attribution):.3f}" in text
    b = pd.read_csv(out / "bayes.csv")  # an organism: its curves beside the exact Bayes-optimal reader
    fl = b[(b.condition == "flipped") & (b.k == b.k.max())].iloc[0]
    assert f"flipped {fl.organism:.2f} [{fl.ci_low:.2f}, {fl.ci_high:.2f}] vs {fl.bayes_accuracy:.2f}" in text
    nh = pd.read_csv(out / "nh_tests.csv")
    assert set(nh.hypothesis) == {"NH1", "NH2"} and "Verdict: NH2 is rejected" in text  # the organism keeps its prior


def test_tables_and_sections_speak_in_words(report):
    """Every header is words (no field name), CIs share a cell with their estimate, and each section's first line
    under its title says how to read it."""
    html = re.sub(r"<script.*?</script>", "", report[1], flags=re.S)
    headers = [re.sub(r"\s+", " ", h).strip() for h in re.findall(r"<th(?:\s[^>]*)?>(.*?)</th>", html, re.S)]
    assert len(headers) > 30 and not [h for h in headers if "_" in h or not h]
    assert not re.search(r"<th[^>]*>\s*ci_(low|high)", html) and "[95% CI]</th>" in html
    cells = re.findall(r"<td>([^<]*)</td>", html)
    assert any(re.fullmatch(rf"[+-]\d\.\d\d{NBSP}\[[+-]\d\.\d\d,{NBSP}[+-]\d\.\d\d\]", c) for c in cells)
    assert not [c for c in cells if c in ("True", "False")]
    guides = re.findall(r'</h2>\n<p class="how">How to read: [^<]+</p>', html)
    assert len(guides) == len(SECTIONS)


def test_every_section_title_has_a_guide_and_nh_scores_have_words():
    from mechicl.analysis.behavior.curves import METRICS
    from mechicl.runs.report_behavior import SCORES, score_words
    from mechicl.runs.report_guides import GUIDES, with_guides

    assert set(SECTIONS) <= set(GUIDES)
    with pytest.raises(ValueError, match="without a how-to-read line"):
        with_guides([Section("Untitled", ())])
    assert {m + s for m in METRICS for s in ("", "_true", "_initial") if m != "entropy"} | {"entropy"} == set(SCORES)
    assert score_words("random/accuracy_true") == "random: accuracy vs true label"


def test_numbers_equal_the_separate_commands(report, tmp_path):
    out, _ = report
    assert (
        main(
            [
                "behavior",
                *ORG[:4],
                "--conditions",
                "default,random,flipped,arbitrary:a/b",
                "--k",
                str(Q.k_max),
                "--n-contexts",
                str(Q.n_behavior),
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "b" / "summary.csv"), pd.read_csv(out / "behavior_summary.csv")
    )
    inside = ["--n-contexts", str(Q.n_inside), "--k", str(Q.n_examples - 1), "--k-min", str(Q.k_min)]
    assert main(["lens", *ORG[:4], *inside, "--out", str(tmp_path / "l")]) == 0
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "l" / "lens_summary.csv"), pd.read_csv(out / "lens_summary.csv")
    )
    assert (
        main(
            [
                "heads",
                *ORG[:4],
                "--k",
                str(Q.n_examples - 1),
                "--k-min",
                str(Q.k_min),
                "--n-screen",
                str(Q.n_screen),
                "--n-confirm",
                str(Q.n_confirm),
                "--n-eval",
                str(Q.n_eval),
                "--candidates",
                str(Q.n_candidates),
                "--n-top",
                str(Q.n_top),
                "--n-control",
                str(Q.n_control),
                "--out",
                str(tmp_path / "h"),
            ]
        )
        == 0
    )
    for name in ("screen", "confirm", "validate", "sets", "controls"):  # the report's cell is `mechicl heads`'
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "h" / f"{name}.csv"), pd.read_csv(out / f"{name}.csv"))
    # the patching caches come from the shared runs; the sweep equals `mechicl patch` on the same contexts
    assert (
        main(
            [
                "patch",
                *ORG[:4],
                "--kinds",
                "head_out",
                "--direction",
                "denoise",
                "--n-contexts",
                str(Q.n_patch),
                "--k",
                str(Q.n_examples - 1),
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    ref = pd.read_csv(tmp_path / "p" / "head_out_denoise.csv")
    mine = pd.read_csv(out / "attribution_vs_exact.csv")
    np.testing.assert_allclose(mine.exact, ref.value, atol=1e-5)


def test_render_report_escapes_and_inlines(tmp_path):
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    sec = Section(
        "A & B",
        (Figure(png, "cap <1>"), Table(pd.DataFrame({"value": [0.12345]}), "t"), Note("n", pointer=True)),
        how_to_read="How to read: <this>.",
    )
    html = render_report("T", ["intro"], [sec], tmp_path / "r.html").read_text()
    assert 'href="#s-a---b"' in html and 'id="s-a---b"' in html and "cap &lt;1&gt;" in html
    assert "data:image/png;base64,iVBORw0KGgpmYWtl" in html and "0.12" in html and 'class="note"' in html
    assert '</h2>\n<p class="how">How to read: &lt;this&gt;.</p>' in html
    assert not EXTERNAL.search(html)


def test_bad_sizes_and_arguments(capsys):
    with pytest.raises(Exception, match="unknown report size"):
        ReportConfig.sized("huge", model="tiny")
    with pytest.raises(SystemExit):
        main(["report", "--quick", "--full"])
    assert main(["report", "--model", "tiny", "--task", "nope", "--quick"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="headless check needs Debian's chromium package (.ci/run installs it)")
def test_report_renders_in_headless_chromium(report):
    """From file://: a non-blank screenshot, every circuitsvis view mounted, no console error, no request off file://."""
    out, _ = report
    page = check_page(out / "report.html")
    assert not page.blank, "blank screenshot"
    assert page.mounts and all(page.mounts), f"a circuitsvis view did not mount (children per view: {page.mounts})"
    assert page.errors == [], f"console errors: {page.errors}"
    assert page.requests and page.external == [], f"requests that leave file://: {page.external}"
    assert page.layout["viewport"] == 1280 and len(page.layout["figures"]) >= 12
    assert page.layout_problems() == [], "layout at a 1280-px viewport:\n" + "\n".join(page.layout_problems())


@pytest.mark.skipif(CHROMIUM is None, reason="headless check needs Debian's chromium package (.ci/run installs it)")
def test_browser_check_catches_a_broken_page(tmp_path):
    """Each of the four checks can fail: an empty page, a view that never mounts, console.error, an http image."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><div id="circuits-vis-1"></div><img src="http://127.0.0.1:9/x.png">'
        '<script>console.error("boom")</script></body></html>'
    )
    page = check_page(bad, mount_wait=0.5)
    assert page.blank and page.mounts == [0] and page.external == ["http://127.0.0.1:9/x.png"]
    assert any("boom" in e for e in page.errors) and any("127.0.0.1:9" in e for e in page.errors)


PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


@pytest.mark.skipif(CHROMIUM is None, reason="headless check needs Debian's chromium package (.ci/run installs it)")
def test_layout_check_catches_an_overflowing_page(tmp_path):
    """A page built to overflow: a fixed-width block wider than the viewport and a figure at a fifth of its section."""
    bad = tmp_path / "wide.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><main style="max-width:900px;margin:auto"><section><h2>1. A</h2>'
        f'<figure><img alt="small" style="width:180px" src="data:image/png;base64,{PNG_1PX}"></figure>'
        '<div id="wide" style="width:1800px">wide</div></section></main></body></html>'
    )
    problems = check_page(bad, mount_wait=0).layout_problems()
    assert any(re.fullmatch(r"page \d+ px wide in a 1280 px viewport", p) for p in problems)
    assert any("div#wide ends at" in p for p in problems) and any("figure small fills 20%" in p for p in problems)


@pytest.mark.skipif(CHROMIUM is None, reason="headless check needs Debian's chromium package (.ci/run installs it)")
def test_report_page_keeps_wide_tables_and_long_words_in_the_column(tmp_path):
    """The report's own CSS: a 1-pixel PNG still fills the column, a 30-column table scrolls inside its box, and
    an unbroken 400-character word wraps instead of widening the page."""
    png = tmp_path / "p.png"
    png.write_bytes(base64.b64decode(PNG_1PX))
    wide = pd.DataFrame({f"column {i} in words": [123456.789 * i] for i in range(30)})
    sec = Section("Wide", (Figure(png, "x" * 400), Table(wide, "y" * 400), Note("z" * 400)), how_to_read="How.")
    page = check_page(render_report("T", ["intro"], [sec], tmp_path / "r.html"), mount_wait=0)
    assert page.layout["figures"] and page.layout_problems() == [], page.layout_problems()


def test_without_attribution_section_3_says_how_to_get_it():
    from mechicl.runs.report_sections import integrated_gradients_pointer

    text = integrated_gradients_pointer("organism-strong", "organism")
    assert "`--no-attribution`" in text and "`mechicl attribute --model organism-strong --task organism`" in text
    assert all(ReportConfig.sized(s, model="m").attribution for s in ("default", "quick", "full"))


def test_holm_p_values_at_their_monte_carlo_floor_read_at_most():
    from mechicl.analysis.stats import holm
    from mechicl.runs.report_behavior import holm_p_texts

    p = np.array([0.2, 1 / 4001, 0.01])  # Holm: 0.2, 3/4001, 0.02
    assert holm_p_texts(p, holm(p), 4000) == ["0.2", "≤ 0.00075", "0.02"]


def test_arbitrary_label_words_default_to_one_letter_per_class():
    assert arbitrary_words(2) == "A/B" and arbitrary_words(3) == "A/B/C"  # vega-cars: USA / Europe / Japan
    with pytest.raises(Exception, match="--arbitrary"):
        arbitrary_words(1)


def test_report_sizes_the_head_finder_to_a_small_model(capsys):
    """A model with fewer heads than n_top + n_control gets a smaller validation, said on stdout (issue 30)."""
    from mechicl.runs.report_data import ReportConfig

    cfg = ReportConfig.sized("quick", model="m", task="t")
    assert cfg.fit_heads(cfg.n_top + cfg.n_control) is cfg  # enough heads: unchanged
    small = cfg.fit_heads(4)
    assert small.n_top + small.n_control <= 4 and small.n_top >= 1 and small.n_control >= 1
    assert "the model has 4 heads" in capsys.readouterr().out
    from mechicl.analysis.heads.finder import check_head_pool

    check_head_pool(small.heads(), 2, 2)  # the fitted sizes pass the finder's own check
