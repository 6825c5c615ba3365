"""Section 1 of `mechicl report`, Behaviour: accuracy curves, the Bayes-optimal reader for organisms, and the NH
tests on the run's behaviour scores; captions are written from the run's own tables."""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd

from mechicl.analysis.behavior.curves import value_at
from mechicl.analysis.stats import paired_test
from mechicl.runs.behavior import plot_metric
from mechicl.runs.behavior_optimal_reader import bayes_reference
from mechicl.runs.folder import RunFolder
from mechicl.runs.report_data import NHTest, ReportData
from mechicl.viz.optimal_reader import accuracy_with_bayes
from mechicl.viz.report_html import Figure, Note, Section, Table
from mechicl.viz.table_words import ci_text

N_SIGN_FLIPS = inspect.signature(paired_test).parameters["n_boot"].default  # the NH tests' sign flips (run_tests)
SCORES = {  # the behaviour metrics an NH test compares, in words with their units
    "accuracy": "accuracy vs shown label",
    "accuracy_true": "accuracy vs true label",
    "log_likelihood": "log P(shown label), nats",
    "log_likelihood_true": "log P(true label), nats",
    "accuracy_initial": "accuracy vs the initial map's label",
    "log_likelihood_initial": "log P(the initial map's label), nats",
    "entropy": "label entropy, nats",
}


def score_words(spec: str) -> str:
    """An NH test's side, ``condition/metric``, in words: "random/accuracy_true" -> "random: accuracy vs true label"."""
    cond, _, metric = spec.partition("/")
    return f"{cond}: {SCORES[metric]}" if metric else cond


def ci(row: pd.Series, col: str = "mean") -> str:
    """``0.58 [0.51, 0.65]`` from a row with mean (or ``col``), ci_low and ci_high."""
    return ci_text(row[col], row.ci_low, row.ci_high)


def holm_p_texts(p: np.ndarray, p_holm: np.ndarray, n_perm: int) -> list[str]:
    """Holm-adjusted Monte-Carlo p-values as text: "≤ x" where the adjusted value comes from a raw p at its floor
    ``1 / (n_perm + 1)`` (Holm's step-down running maximum is traced back to the raw p that set it)."""
    floor = 1 / (n_perm + 1)
    at_floor = np.asarray(p) <= floor * (1 + 1e-9)
    bound, out = np.zeros(len(p), dtype=bool), [""] * len(p)
    running, run_bound = -1.0, False
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        cand = min(1.0, (len(p) - rank) * float(p[i]))
        if cand > running:
            running, run_bound = cand, bool(at_floor[i]) and cand < 1.0
        bound[i] = run_bound
    for i, (ph, b) in enumerate(zip(p_holm, bound)):
        out[i] = f"≤ {ph:.2g}" if b else f"{ph:.3g}"
    return out


def nh_verdict(n: NHTest) -> str:
    """The NH config's verdict on the report's draws, with its Holm p written "≤" at the Monte-Carlo floor."""
    t = n.tests.assign(holm_p=holm_p_texts(n.tests.p_value.to_numpy(), n.tests.p_holm.to_numpy(), N_SIGN_FLIPS))
    rej = t[t.decision == "reject"]
    if rej.empty:
        return f"Verdict: {n.config.hypothesis} is not rejected on these draws ({', '.join(sorted(set(t.decision)))})."
    best = rej.loc[rej.mean_diff.abs().idxmax()]
    return (
        f"Verdict: {n.config.hypothesis} is rejected at k = {', '.join(str(k) for k in rej.k)}. Largest effect: "
        f"{best.a} − {best.b} = {best.mean_diff:+.3f} [95% CI {best.ci_low:+.3f}, {best.ci_high:+.3f}] at k = "
        f"{best.k} (Holm p {'= ' if not best.holm_p.startswith('≤') else ''}{best.holm_p}, n = {best.n}; "
        f"sign-flip p-values from {N_SIGN_FLIPS} flips)."
    )


def behavior_section(folder: RunFolder, d: ReportData, title: str) -> Section:
    s, K = d.behavior.summary, d.config.k_max
    n_classes = d.n_classes
    conds = list(dict.fromkeys(s.condition))
    arb = next(c for c in conds if c.startswith("arbitrary"))
    acc = plot_metric(s, "accuracy", folder / "behavior_accuracy.png", f"{title}: accuracy vs the shown label")
    true_default = s[(s.condition == "default") & (s.metric == "accuracy")].assign(
        metric="accuracy_true"
    )  # shown = true
    tru = plot_metric(
        pd.concat([true_default, s[s.metric == "accuracy_true"]]),
        "accuracy_true",
        folder / "behavior_accuracy_true.png",
        f"{title}: accuracy vs the true label",
    )
    at = {c: value_at(s, c, "accuracy", K) for c in conds}
    cap = (
        f"Accuracy against the label the prompt shows, with 95% CIs over {d.config.n_behavior} shared context draws. "
        f"At k = {K}: default {ci(at['default'])}, flipped {ci(at['flipped'])}, random {ci(at['random'])}, "
        f"{arb} {ci(at[arb])}; default starts at {value_at(s, 'default', 'accuracy', 0)['mean']:.2f} at k = 0. "
        f"Look for the flipped curve: above chance ({1 / n_classes:.2f}) means the model "
        "follows the flipped labels against its prior; "
        f"the distance to default ({at['default']['mean'] - at['flipped']['mean']:.2f} here) is the prior's pull."
    )
    rt = value_at(s, "random", "accuracy_true", K)
    ft = value_at(s, "flipped", "accuracy_true", K)
    cap2 = (
        f"Accuracy against the true label. With random labels it is {ci(rt)} at k = {K} (default {ci(at['default'])}); "
        f"with flipped labels {ci(ft)}: the lower it falls, the more the shown labels override the input's meaning."
    )
    blocks: list = [Figure(acc, cap), Figure(tru, cap2), *bayes_blocks(folder, d, title)]
    for n in d.nh:
        verdict = nh_verdict(n)
        t = n.tests.assign(
            **{"Holm p": holm_p_texts(n.tests.p_value.to_numpy(), n.tests.p_holm.to_numpy(), N_SIGN_FLIPS)}
        )
        t = t[["k", "a", "b", "mean_diff", "ci_low", "ci_high", "Holm p", "decision"]].assign(
            a=t.a.map(score_words), b=t.b.map(score_words)
        )
        blocks.append(
            Table(
                t,
                f"{n.config.hypothesis}: {n.config.statement} Primary tests of "
                f"experiments/{n.config.name}.toml on this run's {n.config.n_contexts} contexts (k <= "
                f"{n.config.k_max}). {verdict}",
            )
        )
    blocks.append(
        Note("NH3 (label switch) needs switching conditions; run `mechicl run experiments/nh3_label_switch.toml`.")
    )
    return Section("Behaviour", tuple(blocks))


def bayes_blocks(folder: RunFolder, d: ReportData, title: str) -> list:
    """An organism on its own task: its accuracy beside the exact Bayes-optimal reader (``bayes.csv``)."""
    b = bayes_reference(d.behavior)
    if b is None:
        return []
    path = accuracy_with_bayes(b, folder / "behavior_bayes.png", f"{title}: dashed = Bayes-optimal reader")
    K = int(b.k.max())
    at = b[b.k == K].set_index("condition")
    worst = b.loc[b["distance"].abs().idxmax()]
    parts = "; ".join(
        f"{c} {r.organism:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] vs {r.bayes_accuracy:.2f}" for c, r in at.iterrows()
    )
    return [
        Figure(
            path,
            f"The organism's language fixes the prior over label maps and the label noise, so the ideal "
            f"reader's accuracy is known exactly (dashed; `data.optimal_reader`). At k = {K}, organism vs Bayes: "
            f"{parts}. The largest distance is {worst['distance']:+.2f} ({worst.condition}, k = "
            f"{int(worst.k)}): where the measured curve sits below the dashed one, the organism reads its "
            "context worse than ideal inference would (`bayes.csv`).",
        )
    ]
