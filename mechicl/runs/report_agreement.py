"""One line per `mechicl report` mechanism section that reads it against the headline: where the headline heads (the finder's
validated heads above their matched controls, ``report_data.headline_heads``) stand in that section's measure, and,
where the section's own top head is another one, what the finder said about that head and why the two can differ.

So a reader never meets three head stories: every section names the same heads or says why not. Every number is
read from the section's own tables; nothing is recomputed here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import pandas as pd

from mechicl.analysis.heads.finder import FindingsResult
from mechicl.data.names import head_name
from mechicl.runs.attribute import top_label_heads
from mechicl.runs.report_data import ReportData, headline_heads
from mechicl.viz.report_html import Note, Section
from mechicl.viz.table_words import ci_text


def _names(df: pd.DataFrame) -> pd.Series:
    return pd.Series([head_name(int(l), int(h)) for l, h in zip(df.layer, df["head"])], index=df.index)


def finder_status(name: str, r: FindingsResult) -> str:
    """What the held-out finder concluded about one head: validated (above controls or not), confirmed only,
    or where the screen ranked it."""
    v, c, s = r.validate, r.confirm, r.screen
    if len(v) and name in set(v.heads):
        row = v[v.heads == name].iloc[0]
        ci = ci_text(row.effect, row.effect_ci_low, row.effect_ci_high, signed=True)
        return f"validated {ci}, " + ("above its controls" if row.above_control else "not above its controls")
    if len(c) and name in set(c.heads):
        row = c[c.heads == name].iloc[0]
        ci = ci_text(row.effect, row.effect_ci_low, row.effect_ci_high, signed=True)
        return f"confirmed at rank {int(row['rank'])} ({ci}) but not among the top {r.config.n_top} validated"
    if len(s) and "screen_rank" in s.columns:
        row = s[_names(s) == name]
        if len(row):
            row = row.iloc[0]
            eff = row.effect if "effect" in s.columns and pd.notna(row.get("effect")) else row.effect_est
            return f"screened at rank {int(row.screen_rank)} of {len(s)} ({eff:+.2f}), not confirmed"
    return "not screened"


def _standing(values: pd.Series, named: Sequence[str], fmt: str = "{:+.2f}") -> str:
    """'L11H2 +0.89 (rank 1 of 72)' per named head, ranked by |value| (largest first)."""
    order = values.abs().rank(ascending=False, method="min")
    return ", ".join(
        f"{n} {fmt.format(values[n])} (rank {int(order[n])} of {len(values)})" for n in named if n in values.index
    )


def _top_other(values: pd.Series, named: Sequence[str], r: FindingsResult, what: str, fmt: str = "{:+.2f}") -> str:
    top = values.abs().idxmax()
    if top in named:
        return f" The {what} is a headline head ({top})."
    return f" The {what} is {top} ({fmt.format(values[top])}), not a headline head: the finder {finder_status(top, r)}."


def attention_line(d: ReportData, named: list[str]) -> str:
    a = d.attention.heads
    att = pd.Series(a.label_attention.to_numpy(), index=_names(a))
    text = f"Readout attention on label tokens (default labels): {_standing(att, named, '{:.2f}')}."
    text += _top_other(att, named, d.heads, "top label-attention head", "{:.2f}")
    if d.attattr is not None:
        t = top_label_heads(d.attattr, len(att))
        aa = pd.Series(t.attribution_flipped.to_numpy(), index=t.name)
        text += (
            f" AttAttr on label tokens (flipped labels; among the heads of the layers it ran): "
            f"{_standing(aa, named, '{:+.3f}')}."
        )
        text += _top_other(aa, named, d.heads, "top AttAttr head", "{:+.3f}")
    return text + " Attention shows where a head looks; a head can look at labels and carry nothing the finder needs."


def patching_line(d: ReportData, named: list[str]) -> str:
    parts = []
    for res in d.patch.results:
        if res.kind == "resid":
            continue
        t = res.table()
        vals = pd.Series(t.effect.to_numpy(), index=_names(t))
        parts.append(f"{res.description}: {_standing(vals, named)}." + _top_other(vals, named, d.heads, "top cell"))
    return (
        " ".join(parts)
        + f" These sweeps patch {d.config.n_patch} contexts at fixed positions; the finder interchanges "
        "each head's output at the readout slots of held-out draws, so a top patching cell that fails validation "
        "moved the logit on these few contexts without a held-out effect above matched controls."
    )


def validation_line(d: ReportData, named: list[str]) -> str:
    v = d.heads.validate
    other = [h for h in v.heads if h not in named]
    return f"The headline heads are this section's heads above their matched controls ({', '.join(named)})." + (
        f" Also validated but not above its controls, so left out of the headline: {', '.join(other)}." if other else ""
    )


def prior_line(d: ReportData, named: list[str]) -> str:
    if d.prior is None or not len(d.prior.prior_heads):
        return "The routes and doses above are measured through the headline heads, each alone."
    p, v = d.prior.prior_heads, d.heads.validate
    out = []
    for _, row in p.iterrows():
        h = row["heads"]
        if h not in named:
            continue
        hv = v[v.heads == h].iloc[0]
        if row.role == hv.role:
            out.append(f"{h} keeps its headline role ({hv.role}) here")
            continue
        out.append(
            f"{h} is '{row.role}' here but '{hv.role}' in the headline: its label signal (interchange) is "
            f"{ci_text(row.interchange, row.interchange_ci_low, row.interchange_ci_high, signed=True)} on this "
            f"section's {d.config.n_prior} contexts and "
            f"{ci_text(hv.interchange, hv.interchange_ci_low, hv.interchange_ci_high, signed=True)} on the finder's "
            f"{d.config.n_eval} validation contexts; the same role rule read on two draws, the larger one deciding "
            "whether a label signal is present"
        )
    others = [h for h in p["heads"] if h not in named]
    text = "Routes and doses are measured through the headline heads, each alone. " + (
        "; ".join(out) + "." if out else "No headline head is among the prior heads."
    )
    return text + (f" Prior heads that are not headline heads: {', '.join(others)}." if others else "")


LINES: dict[str, Callable[[ReportData, list[str]], str]] = {
    "Who looks at labels": attention_line,
    "Who carries the label information causally": patching_line,
    "Validation": validation_line,
    "Prior vs context": prior_line,
}  # "Circuit and findings" is built from the headline heads themselves (replication rows, paths among them)


def with_agreement(sections: Sequence[Section], d: ReportData) -> list[Section]:
    """Each section in ``LINES`` with its line against the headline as its first block (unchanged without
    headline heads: then the headline says why none is named)."""
    named = headline_heads(d.heads)
    if not named:
        return list(sections)
    out = []
    for s in sections:
        if s.title in LINES:
            note = Note(f"Against the headline ({', '.join(named)}): {LINES[s.title](d, named)}")
            s = dataclasses.replace(s, blocks=(note, *s.blocks))
        out.append(s)
    return out
