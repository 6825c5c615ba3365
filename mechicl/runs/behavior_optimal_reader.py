"""The Bayes-optimal reader beside `mechicl behavior`'s curves when the model is an organism.

An organism's language fixes the prior over label maps and the label noise (its checkpoint's
recipe), so the ideal reader's accuracy is known exactly (``data.optimal_reader.bayes_curve``). When
`mechicl behavior` runs an organism (a shipped name or a checkpoint path) on the task ``organism``
with its own label words, ``bayes.csv`` holds, per (condition, k), the measured accuracy with its
interval, the Bayes-optimal accuracy and probability of the shown label, and the distance
organism - Bayes; ``accuracy.png`` draws the Bayes curves (dashed) beside the measured ones.
Conditions the Bayes reader has no definition for (e.g. instruction prefixes) are left out.
"""

from __future__ import annotations

import pandas as pd

from mechicl.analysis.behavior.curves import BehaviorResult
from mechicl.data.optimal_reader import bayes_curve
from mechicl.models.organism import organism_config

COLUMNS = ["condition", "k", "organism", "ci_low", "ci_high", "bayes_accuracy", "bayes_p", "distance"]


def bayes_reference(result: BehaviorResult) -> pd.DataFrame | None:
    """Measured accuracy beside the exact Bayes-optimal reader's, per (condition, k); None when the run is not an
    organism on its own task. Cost: numpy only (no forward)."""
    cfg, s = result.config, result.summary
    org = organism_config(str(cfg.model))
    if org is None or s.task.iloc[0] != "organism" or cfg.label_names:
        return None
    acc = s[s.metric == "accuracy"]
    ks = tuple(int(k) for k in sorted(acc.k.unique()))
    curves = []
    for cond in dict.fromkeys(acc.condition):
        try:
            curves.append(bayes_curve(org.language, (cond,), ks))
        except ValueError:  # a condition the ideal reader of the language does not define
            continue
    if not curves:
        return None
    t = acc[["condition", "k", "mean", "ci_low", "ci_high"]].merge(pd.concat(curves), on=["condition", "k"])
    t = t.rename(columns={"mean": "organism", "accuracy": "bayes_accuracy", "p_target": "bayes_p"})
    return t.assign(distance=t["organism"] - t["bayes_accuracy"])[COLUMNS].reset_index(drop=True)


def bayes_lines(bayes: pd.DataFrame) -> list[str]:
    """summary.md lines: the largest |distance| per condition."""
    lines = [
        "",
        "## Against the Bayes-optimal reader of the organism's language",
        "",
        "`bayes.csv`: accuracy minus the exact Bayes-optimal accuracy (`data.optimal_reader`), per condition and k. "
        "Largest distance per condition:",
        "",
    ]
    for cond, d in bayes.groupby("condition", sort=False):
        r = d.loc[d["distance"].abs().idxmax()]
        lines.append(
            f"- {cond}: {r['distance']:+.3f} at k = {int(r['k'])} (organism {r['organism']:.3f} "
            f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}], Bayes {r['bayes_accuracy']:.3f})"
        )
    return lines
