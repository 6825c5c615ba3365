"""Markdown and plots for `mechicl findings`: one cell's summary, and the grid's replication summary."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mechicl.analysis.heads.finder import FindingsResult
from mechicl.analysis.heads.replication import Replication
from mechicl.analysis.stats import fmt_p
from mechicl.data.names import parse_heads
from mechicl.runs.folder import RunFolder, safe_name
from mechicl.runs.markdown import md_table
from mechicl.viz.findings import effect_panels

RULE = (
    "A head is **above control** in a cell when the 95% CI of (its effect - the mean effect of its matched "
    "control heads), paired over the validation contexts, lies above 0 and the CI of its own effect lies above 0. "
    "A cell **votes** when its correct-vs-flipped gap in P(true) has a CI above 0 and is at least 0.05. "
    "With at least 3 voting cells, a head **replicates** when it is above control in at least 2/3 of them (in a discovery "
    "grid a cell that did not select it counts against it; a pre-registered grid tests every named head in every "
    "cell); **task-specific** when that holds within one task's seeds only; otherwise **not robust**. Its **role** "
    "(label, label+prior, prior, class, generic) is the most frequent over the cells that tested it "
    '(docs/findings.md, "Roles").'
)


def _ci(m: float, lo: float, hi: float, d: int = 3) -> str:
    return f"{m:+.{d}f} [{lo:+.{d - 1}f}, {hi:+.{d - 1}f}]"


def findings_markdown(r: FindingsResult, model: str, task: str) -> str:
    """One cell: the checks, the validated heads against their controls, the set tests."""
    c, b = r.config, r.baseline
    lines = [
        f"# Label-aggregation heads: {model} on {task}, seed {c.seed}",
        "",
        f"Contexts of k = {c.k} demonstrations + 1 query; readout slots k = {c.k_min}..{c.k}. Disjoint draws: "
        f"screen {c.n_screen}, confirm {c.n_confirm}, validate {c.n_validate} contexts (seeds {r.stage_seeds}). "
        f"{c.ablation} ablation, {c.control}-matched controls ({c.n_control} per head); intervals widened by the "
        f"shared-row design effect ({b.get('design_effect', float('nan')):.2f})."
        + (f" Pre-registered heads: {c.heads}." if c.heads else ""),
        "",
        f"Gap in P(true), correct - flipped labels: {_ci(b['gap'], b['gap_ci_low'], b['gap_ci_high'])}; "
        f"default labels vs k = 0 at the last slot: {_ci(b['icl_gain'], b['icl_gain_ci_low'], b['icl_gain_ci_high'])}.",
        "",
        f"**Verdict:** {r.verdict}.",
        "",
    ]
    if not r.has_effect:
        return "\n".join(lines) + "\n"
    lines += ["## Validated heads (held-out contexts) against matched controls", "", md_table(_validated(r)), ""]
    if len(r.sets):
        lines += ["## Set tests", "", md_table(_set_tests(r)), ""]
    lines += ["Stage timings (s): " + ", ".join(f"{k} {t:.0f}" for k, t in r.timings.items()), ""]
    return "\n".join(lines)


def _validated(r: FindingsResult) -> pd.DataFrame:
    """The validated heads against their matched controls, as the cell's summary shows them."""
    v, n_perm = r.validate, r.config.n_perm
    return pd.DataFrame(
        {
            "rank": v["rank"],
            "head": v.heads,
            "effect [95% CI]": [_ci(*x) for x in zip(v.effect, v.effect_ci_low, v.effect_ci_high)],
            "controls (mean; min..max)": [
                f"{a} ({m:+.3f}; {lo:+.2f}..{hi:+.2f})"
                for a, m, lo, hi in zip(v.controls, v.control_mean, v.control_min, v.control_max)
            ],
            "head - controls [95% CI]": [_ci(*x) for x in zip(v["diff"], v.diff_ci_low, v.diff_ci_high)],
            "p": [fmt_p(p, n_perm) for p in v.p],
            "above control": v.above_control,
            "role": v.role,
            "interchange (share of gap)": [
                _ci(*x, d=2) for x in zip(v.interchange, v.interchange_ci_low, v.interchange_ci_high)
            ],
            "ΔP(true) ablated, correct": [
                _ci(*x) for x in zip(v.ablated_correct, v.ablated_correct_ci_low, v.ablated_correct_ci_high)
            ],
            "ΔP(true) ablated, flipped": [
                _ci(*x) for x in zip(v.ablated_flipped, v.ablated_flipped_ci_low, v.ablated_flipped_ci_high)
            ],
            "ΔP(true) zero-shot": [
                _ci(*x) for x in zip(v.d_p_zero_shot, v.d_p_zero_shot_ci_low, v.d_p_zero_shot_ci_high)
            ],
            "gap reduction (acc., last slot)": [
                _ci(*x, d=2) for x in zip(v.gap_reduction, v.gap_reduction_ci_low, v.gap_reduction_ci_high)
            ],
        }
    )


def _set_tests(r: FindingsResult) -> pd.DataFrame:
    """The set tests (top pair, top set) against their controls."""
    s = r.sets
    return pd.DataFrame(
        {
            "test": s.test,
            "effect [95% CI]": [_ci(*x) for x in zip(s.effect, s.effect_ci_low, s.effect_ci_high)],
            "controls' mean": s.control_mean.map(lambda x: f"{x:+.3f}"),
            "difference [95% CI]": [_ci(*x) for x in zip(s["diff"], s.diff_ci_low, s.diff_ci_high)],
            "p": [fmt_p(p, r.config.n_perm) for p in s.p],
            "above control": s.above_control,
            "role": s.get("role", pd.Series([""] * len(s))).fillna(""),
        }
    )


def head_table(rep: Replication) -> pd.DataFrame:
    """The README's "Head-level findings" rows: per model, every validated head with its verdict."""
    h = rep.heads
    if not len(h):
        return pd.DataFrame()
    return pd.DataFrame(
        {
            "model": h.model,
            "head": h["head"],
            "verdict": h.verdict,
            "role (cells)": [f"{r} ({rs})" if r else "" for r, rs in zip(h.role, h.roles)],
            "above control / voting cells": [f"{a}/{n}" for a, n in zip(h.n_above_control, h.n_cells)],
            "tested": h.n_tested,
            "per task (above/cells)": h.per_task,
            "effect median [min, max]": [
                f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]" for m, lo, hi in zip(h.effect_median, h.effect_min, h.effect_max)
            ],
            "controls (median)": h.control_mean_median.map(lambda x: f"{x:+.2f}"),
        }
    )


def anchor_rows(rep: Replication) -> pd.DataFrame:
    """Our numbers beside Halawi et al.'s GPT-J anchor (top heads vs random/matched heads)."""
    rows = [
        {
            "source": "Halawi et al. (GPT-J 6B)",
            "heads": "5 false-induction heads",
            "gap closed by the intervention": "39% (accuracy; mean ablation)",
            "control": "4% (random heads)",
        }
    ]
    c = rep.cells[rep.cells.has_effect]
    for model, g in c.groupby("model"):
        g = g.dropna(subset=["top_set_effect"])
        if not len(g):
            continue
        rows.append(
            {
                "source": f"mechicl, {model} ({len(g)} cells, median)",
                "heads": "top 3 validated heads",
                "gap closed by the intervention": f"{100 * g.top_set_effect.median():.0f}% (P(true), slots) / "
                f"{100 * g.top_set_gap_reduction.median():.0f}% (accuracy, last slot)",
                "control": f"{100 * g.top_set_control.median():.0f}% / {100 * g.top_set_control_gap_reduction.median():.0f}% "
                f"(layer- and norm-matched sets)",
            }
        )
    return pd.DataFrame(rows)


def cells_table(rep: Replication) -> pd.DataFrame:
    c = rep.cells
    return pd.DataFrame(
        {
            "model": c.model,
            "task": c.task,
            "seed": c.seed,
            "gap P(true) [95% CI]": [_ci(*x) for x in zip(c.gap, c.gap_ci_low, c.gap_ci_high)],
            "default vs k=0 [95% CI]": [_ci(*x) for x in zip(c.icl_gain, c.icl_gain_ci_low, c.icl_gain_ci_high)],
            "validated top heads": c.top_heads.where(c.has_effect, "no in-context effect to attribute"),
            "above control": c.above_control,
            "top-3 set vs matched": [
                "" if np.isnan(e) else f"{e:+.2f} vs {m:+.2f}" for e, m in zip(c.top_set_effect, c.top_set_control)
            ],
            "s": c.seconds.map(lambda x: f"{x:.0f}"),
        }
    )


def write_summary(rep: Replication, folder: RunFolder, spec: Any = None) -> None:
    """cells.csv, heads.csv, task_agreement.csv, effect_maps.csv, one effects_<model>.png per model, summary.md."""
    for name in ("cells", "heads", "task_agreement", "effect_maps"):
        folder.csv(f"{name}.csv", getattr(rep, name))
    for model, g in rep.effect_maps.groupby("model"):
        L, H = int(g.layer.max()) + 1, int(g["head"].max()) + 1
        maps, marks = {}, {}
        for task, t in g.groupby("task"):
            m = np.full((L, H), np.nan)
            m[t.layer.to_numpy(int), t["head"].to_numpy(int)] = t.effect.to_numpy()
            maps[task] = m
            above = rep.cells[(rep.cells.model == model) & (rep.cells.task == task)].above_control
            marks[task] = [h for s in above if isinstance(s, str) for h in parse_heads(s)]
        effect_panels(
            maps,
            folder / f"effects_{safe_name(model)}.png",  # a model path's / would leave the folder
            f"{model}: screening effect of each head alone (mean over seeds); outlined: above matched controls in a cell",
            marks=marks,
        )
    total = float(rep.cells.seconds.sum())
    lines = [
        "# Findings grid",
        "",
        f"{len(rep.cells)} cells; stage time {total / 60:.1f} min in all (model loading excluded).",
        "",
        RULE,
        "",
        "## Head-level findings",
        "",
        md_table(head_table(rep)) if len(rep.heads) else "No head was validated.",
        "",
        "## Beside the published anchors",
        "",
        md_table(anchor_rows(rep)),
        "",
        "## Cells",
        "",
        md_table(cells_table(rep)),
        "",
        "## Agreement between tasks (Spearman of screening effects over all heads)",
        "",
        md_table(rep.task_agreement) if len(rep.task_agreement) else "Fewer than two tasks with an effect.",
        "",
    ]
    folder.text("summary.md", "\n".join(lines))
