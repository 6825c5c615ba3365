"""`mechicl prior`'s summary.md: its tables in words (one row per bin and k band) and the prior-head and dose lines."""

from __future__ import annotations

import pandas as pd

from mechicl.runs.markdown import md_table
from mechicl.viz.table_words import ci_text

HOW_TO_READ = (
    "Prior strength = the model's zero-shot log-odds for the query's true class (k = 0). Per bin of prior "
    "strength and k: P(true) with correct and with flipped labels, the share of flipped-label queries still "
    "answered with the true class (the prior wins), and each head set's label information: ΔP(true) when its "
    "output at the slot is swapped with the other condition's (flipped minus correct; 0 = it carries none). "
    "Routes: the logit difference (true - flipped label) lost when the readout slot reads the flipped "
    "rendering's keys and values at the label tokens, at the query's own input tokens or at the rest, as a "
    "share of the whole gap. Dose: a head set's label signal (or, for prior heads, its output) scaled at every "
    "slot of the flipped contexts; the flip point is the scale where half the queries side with the shown labels. "
    "95% CIs: bootstrap over contexts (a context's slots together). Prior heads are selected on two draws of task "
    "rows and everything reported is measured on a third."
)


def _ci(v: float, lo: float, hi: float, digits: int = 2) -> str:
    """``+0.84 [+0.14, +1.35]``: the report's one CI formatter (``viz.table_words.ci_text``), signed."""
    return ci_text(v, lo, hi, digits, signed=True)


def slots_summary(tab: pd.DataFrame) -> pd.DataFrame:
    ci = lambda r, c: _ci(r[c], r[c + "_ci_low"], r[c + "_ci_high"], 3 if c == "closed" else 2)  # noqa: E731
    return pd.DataFrame(
        {
            "heads": tab.heads,
            "k": [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(tab.k_lo, tab.k_hi)],
            "zero-shot log-odds": tab.prior_bin,
            "queries (contexts)": [f"{a} ({b})" for a, b in zip(tab.n_slots, tab.n_contexts)],
            "P(true) correct / flipped": [f"{a:.2f} / {b:.2f}" for a, b in zip(tab.p_correct, tab.p_flipped)],
            "flipped: still answers the true class": [ci(r, "sides_with_prior") for _, r in tab.iterrows()],
            "heads' label information (ΔP flipped - ΔP correct)": [ci(r, "closed") for _, r in tab.iterrows()],
        }
    )


def routes_summary(routes: pd.DataFrame) -> pd.DataFrame:
    """One row per k band and prior bin, one column per route: share of the logit gap with its CI."""
    t = routes.assign(
        k=[f"{a}" if a == b else f"{a}-{b}" for a, b in zip(routes.k_lo, routes.k_hi)],
        cell=[_ci(s, lo, hi) for s, lo, hi in zip(routes.share, routes.ci_low, routes.ci_high)],
    )
    wide = t.pivot_table(index=["k", "k_lo", "prior_bin"], columns="route", values="cell", aggfunc="first", sort=False)
    gaps = t.drop_duplicates(["k", "prior_bin"]).set_index(["k", "k_lo", "prior_bin"])[["gap", "n_slots"]]
    wide = wide.join(gaps).reset_index()  # pooled k bands first, then each prior bin's
    cols = [c for c in ("labels", "query", "rest", "interaction") if c in wide] + [
        c for c in wide if str(c).startswith("labels via")
    ]
    out = wide[["prior_bin", "k", "n_slots", "gap", *cols]].rename(
        columns={"prior_bin": "zero-shot log-odds", "n_slots": "queries", "gap": "logit gap (correct - flipped)"}
    )
    return out.assign(**{"logit gap (correct - flipped)": out["logit gap (correct - flipped)"].map("{:+.2f}".format)})


def prior_heads_summary(val: pd.DataFrame) -> pd.DataFrame:
    """One row per validated prior-head candidate: support, against controls, label information, role."""
    return pd.DataFrame(
        {
            "head": val.heads,
            "selected by": val.selected_by,
            "support for the zero-shot answer (log-odds)": [
                _ci(r.support, r.support_ci_low, r.support_ci_high) for r in val.itertuples()
            ],
            "matched controls": val.controls,
            "head - controls (log-odds)": [_ci(r.diff, r.diff_ci_low, r.diff_ci_high) for r in val.itertuples()],
            "label information (interchange, share of gap)": [
                _ci(r.interchange, r.interchange_ci_low, r.interchange_ci_high) for r in val.itertuples()
            ],
            "zero-shot ΔP(true), resample-ablated": [
                _ci(r.d_p_zero_shot, r.d_p_zero_shot_ci_low, r.d_p_zero_shot_ci_high, 3) for r in val.itertuples()
            ],
            "role": val.role,
            "prior head": ["yes" if x else "no" for x in val.prior_head],
        }
    )


def dose_summary(dose: pd.DataFrame) -> pd.DataFrame:
    """One row per head set and k band: the measured and predicted flip points, and the share siding with the
    labels at the smallest and largest dose."""
    rows = []
    for (heads, kind, lo, hi), g in dose.groupby(["heads", "kind", "k_lo", "k_hi"], sort=False):
        first, last = g.iloc[0], g.iloc[-1]
        # a flip point that never comes is NaN, an interval end some draws never reach +inf: both read "never"
        fp = lambda c: (
            "never"
            if pd.isna(first[c])
            else _ci(first[c], first[c + "_ci_low"], first[c + "_ci_high"]).replace("n/a", "never")
        )  # noqa: E731
        row = {
            "heads (scaled)": f"{heads} ({'label signal' if kind == 'label' else 'output'})",
            "k": f"{lo}" if lo == hi else f"{lo}-{hi}",
            f"side with labels at x{first.scale:g}": f"{first.sides_with_labels:.2f}",
            f"side with labels at x{last.scale:g} (predicted)": f"{last.sides_with_labels:.2f} ({last.predicted_sides:.2f})",
            "flip point, measured": fp("flip_measured"),
            "flip point, predicted": fp("flip_predicted"),
        }
        if "bayes_flip" in g:
            row["Bayes reader's flip factor"] = f"{first.bayes_flip:.2f}"
        rows.append(row)
    return pd.DataFrame(rows)


def prior_lines(t) -> list[str]:
    """The prior-head and dose sections of summary.md (``t``: ``runs.prior.PriorTables``)."""
    lines = []
    if len(t.prior_heads) and "role" in t.prior_heads:
        lines += ["## Prior heads (validated on the third draw)", "", md_table(prior_heads_summary(t.prior_heads)), ""]
    elif len(t.prior_heads):  # candidates, but no in-context gap on the validate draw: no roles, no verdicts
        names = ", ".join(t.prior_heads.heads)
        lines += [
            "## Prior heads",
            "",
            f"Candidates {names}: the validate draw's correct-vs-flipped gap in P(true) has a 95% CI reaching 0, "
            "so their roles, and with them the prior-head verdict, are undefined (prior_select.csv has the "
            "confirmation draw's support).",
            "",
        ]
    elif len(t.prior_select):
        lines += ["## Prior heads", "", "No screened candidate had a support CI above 0 on the confirmation draw.", ""]
    if len(t.dose):
        lines += ["## Dose-response (flipped contexts)", "", md_table(dose_summary(t.dose)), ""]
    return lines
