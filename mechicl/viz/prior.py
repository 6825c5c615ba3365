"""`mechicl prior`'s figures: per prior bin, who wins at each k. Drawing only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mechicl.viz.plots import line_plot, plt, wrap_title


def prior_figures(tab: pd.DataFrame, folder: Path, title: str) -> list[Path]:
    """``prior_sides.png``: the share of flipped-label slots still answered with the true class (the prior wins) per
    prior bin against k; ``prior_heads_<set>.png``: each head set's interchange effect (ΔP flipped - ΔP correct)
    per prior bin against k, with 95% CIs."""
    if not len(tab):
        return []
    t = tab.assign(k=tab.k_lo.astype(int))
    first = t[t.heads == t.heads.iloc[0]]
    out = [
        line_plot(
            first,
            "k",
            "sides_with_prior",
            folder / "prior_sides.png",
            hue="prior_bin",
            band=("sides_with_prior_ci_low", "sides_with_prior_ci_high"),
            title=f"Flipped labels: share of queries still answered with the true class, by zero-shot log-odds - {title}",
            ylabel="sides with the prior",
            xlabel="k (demonstrations before the query)",
        )
    ]
    for heads, g in t.groupby("heads", sort=False):
        out.append(
            line_plot(
                g,
                "k",
                "closed",
                folder / f"prior_heads_{heads.replace(' ', '_')}.png",
                hue="prior_bin",
                band=("closed_ci_low", "closed_ci_high"),
                title=f"{heads}: label information it carries (interchange), by zero-shot log-odds - {title}",
                ylabel="ΔP(true) flipped - ΔP(true) correct",
                xlabel="k (demonstrations before the query)",
            )
        )
    return out


ROUTE_COLOURS = {"labels": "tab:red", "query": "tab:blue", "rest": "tab:grey", "interaction": "tab:purple"}


def _bin_low(label: str) -> float:
    """The lower edge of a prior bin label such as ``"[-1, +0)"`` or ``"[+2, inf)"``; a label without one
    (``"all"``) sorts first."""
    try:
        return float(label.strip("[]()").split(",")[0])
    except ValueError:
        return float("-inf")


def competition_figure(routes: pd.DataFrame, sides: pd.DataFrame, path: Path, title: str) -> Path:
    """Who wins, at which k, for which queries: one column per prior bin. Top: each route's share of the
    flipped-vs-correct logit difference at the readout slot (label positions, the query's own input, the rest,
    and what only arrives when they combine), with 95% CIs. Bottom: the share of flipped-label queries still
    answered with the true class (above 0.5 the prior wins), with 95% CIs."""
    bins = sorted(routes.prior_bin.drop_duplicates(), key=_bin_low)  # left to right: weakest prior for the truth
    fig, axes = plt.subplots(2, len(bins), figsize=(2.6 * len(bins) + 1, 5.2), dpi=120, sharex=True, squeeze=False)
    for j, b in enumerate(bins):
        top, bottom = axes[0, j], axes[1, j]
        for route, colour in ROUTE_COLOURS.items():
            d = routes[(routes.prior_bin == b) & (routes.route == route)].sort_values("k_lo")
            if len(d):
                top.plot(d.k_lo, d.share, marker="o", ms=3, color=colour, label=route)
                top.fill_between(d.k_lo, d.ci_low, d.ci_high, color=colour, alpha=0.15, lw=0)
        top.axhline(0, color="black", lw=0.6)
        top.set_title(f"zero-shot log-odds {b}", fontsize=8)
        s = sides[sides.prior_bin == b].drop_duplicates(["k_lo", "prior_bin"]).sort_values("k_lo")
        bottom.plot(s.k_lo, s.sides_with_prior, marker="o", ms=3, color="black")
        bottom.fill_between(s.k_lo, s.sides_with_prior_ci_low, s.sides_with_prior_ci_high, color="black", alpha=0.15)
        bottom.axhline(0.5, color="grey", ls="--", lw=1)
        bottom.set_ylim(0, 1)
        bottom.set_xlabel("k (band start)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("share of the logit gap")
    axes[1, 0].set_ylabel("flipped: still the true class\n(> 0.5: the prior wins)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(wrap_title(title, 2.6 * len(bins) + 1, 9), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def dose_figure(dose: pd.DataFrame, path: Path, title: str) -> Path:
    """One panel per scaled head set, at its largest k band: the share of flipped-label queries that side with the
    shown labels against the scale (measured, with 95% CIs; predicted from scales 0 and 1, dashed), the measured
    flip point, and on organisms the Bayes-optimal reader's evidence flip factor."""
    last = dose[dose.k_lo == dose.k_lo.max()]
    groups = list(last.groupby(["heads", "kind"], sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.0 * len(groups) + 0.6, 3.4), dpi=120, squeeze=False)
    for ax, ((heads, kind), g) in zip(axes[0], groups):
        ax.plot(g.scale, g.sides_with_labels, marker="o", ms=3, color="tab:red", label="measured")
        ax.fill_between(g.scale, g.sides_with_labels_ci_low, g.sides_with_labels_ci_high, color="tab:red", alpha=0.15)
        ax.plot(g.scale, g.predicted_sides, ls="--", color="black", lw=1, label="predicted (from x0, x1)")
        ax.axhline(0.5, color="grey", lw=0.6)
        fp = g.flip_measured.iloc[0]
        if pd.notna(fp):
            ax.axvline(fp, color="tab:red", ls=":", lw=1, label=f"flip x{fp:.2f}")
        if "bayes_flip" in g and pd.notna(g.bayes_flip.iloc[0]):
            ax.axvline(g.bayes_flip.iloc[0], color="tab:green", ls="-.", lw=1, label="Bayes reader's flip")
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"scale of its {'label signal' if kind == 'label' else 'output'}")
        ax.set_title(f"{heads} (k {g.k_lo.iloc[0]}-{g.k_hi.iloc[0]})", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("flipped: side with the shown labels")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(wrap_title(f"Dose-response - {title}", 3.0 * len(groups) + 0.6, 9), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
