"""The report's "Prior vs context" section: how the validated heads' label information meets the zero-shot prior,
from interventions with CIs (``runs.prior.compute_prior`` on the validate draw): the routes into the readout slot,
who wins per prior bin and k, the dose-response of the label heads, and the prior heads found on other draws."""

from __future__ import annotations

import pandas as pd

from mechicl.runs.folder import RunFolder
from mechicl.runs.prior_summary import prior_heads_summary
from mechicl.runs.report_data import ReportData
from mechicl.viz.prior import competition_figure, dose_figure
from mechicl.viz.report_html import Figure, Note, Section, Table
from mechicl.viz.table_words import ci_text

ROUTE_WORDS = {
    "labels": "label tokens",
    "query": "the query's own input",
    "rest": "other positions",
    "interaction": "only when combined",
}


def _cell(r: pd.Series) -> str:
    return ci_text(r.share, r.ci_low, r.ci_high, signed=True)


def routes_words(routes: pd.DataFrame) -> pd.DataFrame:
    """Pooled over prior bins, one row per k band: each route's share of the logit gap with its CI."""
    pooled = routes[routes.prior_bin == "all"]
    rows = []
    for (lo, hi), g in pooled.groupby(["k_lo", "k_hi"], sort=False):
        by = g.set_index("route")
        row = {
            "k band": f"{lo}" if lo == hi else f"{lo}-{hi}",
            "queries (readout slots)": int(g.n_slots.iloc[0]),
            "logit gap, correct − flipped": f"{g.gap.iloc[0]:+.2f}",
        }
        row.update({w: _cell(by.loc[r]) for r, w in ROUTE_WORDS.items() if r in by.index})
        row.update(
            {
                f"label tokens via {r[len('labels via ') :]}": _cell(by.loc[r])
                for r in by.index
                if r.startswith("labels via")
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)


def _route_caption(routes: pd.DataFrame, heads: list[str]) -> str:
    pooled = routes[routes.prior_bin == "all"]
    last = pooled[pooled.k_lo == pooled.k_lo.max()].set_index("route")
    via = [f"{h} {_cell(last.loc['labels via ' + h])}" for h in heads if "labels via " + h in last.index]
    return (
        f"Where the flipped-vs-correct logit difference enters the readout slot, as a share of it (k "
        f"{last.k_lo.iloc[0]}-{last.k_hi.iloc[0]}): label tokens {_cell(last.loc['labels'])}, the query's own input "
        f"{_cell(last.loc['query'])}, other positions {_cell(last.loc['rest'])}. Through the validated heads alone: "
        f"{'; '.join(via) or 'none measured'} (a head's share can pass 1 when other heads push the other way)."
    )


def _dose_caption(dose: pd.DataFrame) -> str:
    last = dose[(dose.kind == "label") & (dose.k_lo == dose.k_lo.max())].drop_duplicates("heads")
    top = float(dose.scale.max())

    def at(x: float) -> str:  # a flip point or an interval end: 'never' past the largest dose
        return f"never within x{top:g}" if pd.isna(x) or x == float("inf") else f"x{x:.2f}"

    parts = []
    for r in last.itertuples():
        m = f"{at(r.flip_measured)} [{at(r.flip_measured_ci_low)}, {at(r.flip_measured_ci_high)}]"
        p = f"{at(r.flip_predicted)} [{at(r.flip_predicted_ci_low)}, {at(r.flip_predicted_ci_high)}]"
        parts.append(f"{r.heads}: half the flipped queries follow the labels at {m} (predicted from x0 and x1: {p})")
    return (
        "Each headline head's label signal scaled in the flipped contexts (x0 = its correct-label output, x1 = as "
        "run); measured with 95% CIs, the linear prediction dashed. Flip points with 95% bootstrap CIs over contexts "
        f"(k {int(last.k_lo.iloc[0])}-{int(last.k_hi.iloc[0])}): "
        + "; ".join(parts)
        + ". A wide interval means few queries sit near the flip."
    )


def prior_section(folder: RunFolder, d: ReportData, title: str) -> Section:
    """Causal results on the validated heads; a note where the finder named none (no in-context gap)."""
    t = d.prior
    if t is None:
        return Section(
            "Prior vs context",
            (
                Note(
                    "No head was validated (no in-context gap on this draw), so there is no head to set against the prior."
                ),
            ),
        )
    heads = list(t.moderation.heads.drop_duplicates())
    comp = competition_figure(
        t.routes[t.routes.prior_bin != "all"], t.moderation, folder / "prior_competition.png", title
    )
    blocks: list = [
        Figure(
            comp,
            "Who wins, per bin of the query's zero-shot log-odds for its true class: top, each route's share of the "
            "logit gap; bottom, the share of flipped-label queries still answered with the true class (above 0.5 the "
            "prior wins). " + _route_caption(t.routes, heads),
        ),
        Table(routes_words(t.routes), "Routes into the readout slot, pooled over prior bins (share of the logit gap)."),
    ]
    if len(t.dose):
        blocks.append(Figure(dose_figure(t.dose, folder / "prior_dose.png", title), _dose_caption(t.dose)))
    if len(t.prior_heads) and "role" in t.prior_heads:
        found = list(t.prior_heads.heads[t.prior_heads.prior_head])
        cap = (
            f"Prior heads, selected on two other draws of task rows and validated on this one: "
            f"{', '.join(found) or 'none passes'} (above matched controls, role prior)."
        )
        blocks.append(Table(prior_heads_summary(t.prior_heads), cap))
    return Section("Prior vs context", tuple(blocks))
