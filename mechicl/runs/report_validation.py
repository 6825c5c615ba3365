"""Section 5 of `mechicl report`, Validation: the held-out head finder's cell (``runs.heads.find_heads_for``):
the screen's layer x head map, the validated heads against their matched controls, the set tests. Every
number in the captions is read from the cell's own tables (validate.csv, sets.csv, screen.csv)."""

from __future__ import annotations

from mechicl.analysis.heads.finder import FindingsResult
from mechicl.analysis.stats import fmt_p
from mechicl.data.names import head_name
from mechicl.runs.folder import RunFolder
from mechicl.runs.report_data import ReportData
from mechicl.viz.plots import head_map
from mechicl.viz.report_html import Figure, Note, Section, Table
from mechicl.viz.table_words import ci_text

VALIDATE_COLUMNS = [
    "rank",
    "heads",
    "effect",
    "effect_ci_low",
    "effect_ci_high",
    "controls",
    "control_mean",
    "diff",
    "diff_ci_low",
    "diff_ci_high",
    "p",
    "above_control",
    "d_p_zero_shot",
    "d_p_zero_shot_ci_low",
    "d_p_zero_shot_ci_high",
]


def _ci(m: float, lo: float, hi: float) -> str:
    return ci_text(m, lo, hi, signed=True)


def _setup(r: FindingsResult) -> str:
    c = r.config
    return (
        f"Contexts of k = {c.k} demonstrations + 1 query; readout slots k = {c.k_min}..{c.k}; disjoint draws of "
        f"{c.n_screen} (screen), {c.n_confirm} (confirm) and {c.n_validate} (validate) contexts; {c.ablation} "
        f"ablation of each head's output at those slots"
    )


def _top_caption(r: FindingsResult) -> str:
    """The top validated head against its matched controls, and the verdict."""
    c, b, t = r.config, r.baseline, r.validate.iloc[0]
    return (
        f"{_setup(r)}. Without ablation the correct-vs-flipped gap in P(true) is "
        f"{_ci(b['gap'], b['gap_ci_low'], b['gap_ci_high'])}. Ablating {t.heads} closes {_ci(t.effect, t.effect_ci_low, t.effect_ci_high)} "
        f"of it on the validation contexts; its {c.n_control} matched control heads ({t.controls}: same layer, "
        f"nearest in output norm) close {t.control_mean:+.2f} on average; {t.heads} − controls "
        f"{_ci(t['diff'], t.diff_ci_low, t.diff_ci_high)} (sign-flip {fmt_p(t.p, c.n_perm)}). Zero-shot ΔP(true) when "
        f"it is ablated: {_ci(t.d_p_zero_shot, t.d_p_zero_shot_ci_low, t.d_p_zero_shot_ci_high)}. Verdict: {r.verdict}. "
        "A head is above control when both CIs (its effect, head − controls) lie above 0 (validate.csv)."
    )


def _screen_figure(folder: RunFolder, r: FindingsResult, title: str) -> Figure:
    s = r.screen
    col = "effect" if "effect" in s.columns and s["effect"].notna().any() else "effect_est"
    head_map(folder, s, col, "screen_effect.png", f"{title}: share of the gap closed, each head alone (screen draw)")
    best = s.iloc[0]
    return Figure(
        folder.path / "screen_effect.png",
        f"Screen: each head ablated alone on the {r.config.n_screen} screening contexts ({col}). Ranked first: "
        f"{head_name(best.layer, best['head'])} ({best[col]:+.2f}); the top {r.config.n_candidates} were confirmed "
        f"on {r.config.n_confirm} other contexts and the top {r.config.n_top} validated (screen.csv, confirm.csv).",
    )


def validation_section(folder: RunFolder, d: ReportData, title: str) -> Section:
    """The finder's cell: a note when there is no in-context effect to attribute, else the map and the tables."""
    r = d.heads
    if not r.has_effect:
        b = r.baseline
        return Section(
            "Validation",
            (
                Note(
                    f"{_setup(r)}. No validation: the correct-vs-flipped gap in P(true) is "
                    f"{_ci(b['gap'], b['gap_ci_low'], b['gap_ci_high'])}, whose CI does not lie above 0, so there is "
                    f"{r.verdict} (validate.csv is empty)."
                ),
            ),
        )
    v = r.validate[VALIDATE_COLUMNS].assign(p=[fmt_p(p, r.config.n_perm) for p in r.validate.p])
    blocks: list = [_screen_figure(folder, r, title), Table(v, _top_caption(r))]
    if len(r.sets):
        s = r.sets[["test", "effect", "effect_ci_low", "effect_ci_high", "control_mean", "diff", "p", "above_control"]]
        blocks.append(
            Table(
                s.assign(p=[fmt_p(p, r.config.n_perm) for p in s.p]),
                "Set tests (sets.csv): the top two heads together against the top head with each of the second's "
                "controls, and the top set against sets of matched controls.",
            )
        )
    return Section("Validation", tuple(blocks))
