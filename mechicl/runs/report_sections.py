"""The sections of `mechicl report`: figures drawn into the run folder and captions written from the run's numbers."""

from __future__ import annotations

import importlib.metadata as md
import inspect
import platform

import numpy as np
import pandas as pd

from mechicl.analysis.behavior.curves import value_at
from mechicl.analysis.inside.attention import context_patterns
from mechicl.analysis.inside.frames import top_heads
from mechicl.analysis.patching.exact import PatchResult
from mechicl.analysis.stats import fmt_p, paired_test
from mechicl.data.task import Task
from mechicl.models.base import LoadedModel
from mechicl.runs.attention import plot_attention
from mechicl.runs.attribute import plot_label_vs_input, top_label_heads
from mechicl.runs.behavior import plot_metric
from mechicl.runs.behavior_optimal_reader import bayes_reference
from mechicl.runs.folder import RunFolder
from mechicl.runs.lens import plot_lens
from mechicl.runs.patch import write_patch_results
from mechicl.runs.report_circuit import circuit_section
from mechicl.runs.report_data import NHTest, ReportConfig, ReportData
from mechicl.viz.optimal_reader import accuracy_with_bayes
from mechicl.viz.plots import heatmap
from mechicl.viz.report_html import Figure, Note, Section, Table, View, attention_view
from mechicl.viz.report_plots import histogram, scatter

N_SIGN_FLIPS = inspect.signature(paired_test).parameters["n_boot"].default  # the NH tests' sign flips (run_tests)
PACKAGES = ("mechicl", "torch", "transformer-lens", "transformers", "circuitsvis", "numpy", "pandas", "scipy")


def ci(row: pd.Series, col: str = "mean") -> str:
    """``0.58 [0.51, 0.65]`` from a row with mean (or ``col``), ci_low and ci_high."""
    return f"{row[col]:.2f} [{row.ci_low:.2f}, {row.ci_high:.2f}]"


def mc_p(p: float, n_draws: int) -> str:
    """A Monte-Carlo p-value ``(1 + hits) / (1 + n_draws)`` as text; at its floor ``1 / (1 + n_draws)`` "≤ floor"."""
    return fmt_p(p, int(n_draws)).replace("<= ", "≤ ")


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


def intro(loaded: LoadedModel, task: Task, cfg: ReportConfig) -> list[str]:
    return [
        f"Model {loaded.name} ({loaded.source}); task {task.name}: {task.description}. Seed {cfg.seed}. "
        "Every number in the captions below is computed by this run; the CSV files next to this page hold them all.",
        "Reading guide: behaviour first (does the model follow in-context labels?), then where in depth "
        "the flipped labels change the prediction, which heads attend to the labels, which carry them causally, "
        "whether ablating them matters more than ablating random heads, and which heads side with the prior.",
    ]


# ------------------------------------------------------------- 1. behaviour


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
        t = t[["k", "a", "b", "mean_diff", "ci_low", "ci_high", "Holm p", "decision"]]
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


# ------------------------------------------------------------- 2. lens


def lens_section(folder: RunFolder, d: ReportData, title: str) -> Section:
    lens = d.lens
    plot_lens(folder, lens, title)
    g = lens.gap[lens.gap.metric == "accuracy_true"].set_index("depth")
    best = g["mean"].idxmax()
    crit = lens.critical_depth
    where = (
        f"flipped-label true-label accuracy departs from default at depth {crit} (gap {ci(g.loc[crit])})"
        if crit is not None
        else f"no depth shows a gap >= {lens.min_gap} with a CI above 0 (no critical layer)"
    )
    cap = (
        f"Logit lens: label-set accuracy read from the residual after each block (0 = embeddings), averaged over "
        f"readout slots with k >= {d.config.k_min}; {where}. The largest gap is {ci(g.loc[best])} at depth {best}. "
        "Caveat: the lens applies the final norm and unembedding to intermediate residuals the model never "
        "decodes there, so the critical layer is where the flip becomes readable, not necessarily where it is computed."
    )
    return Section(
        "Where the flip happens",
        (
            Figure(folder.path / "lens_accuracy.png", cap),
            Figure(
                folder.path / "lens_log_likelihood.png",
                "The same in log-likelihood of the true (and, for "
                "flipped contexts, the shown) label; the dashed line marks the critical depth if any.",
            ),
        ),
    )


# ------------------------------------------------------------- 3. attention


def attention_section(folder: RunFolder, loaded: LoadedModel, d: ReportData, title: str) -> Section:
    """Long because it writes five captioned figures and the interactive view."""
    r, top_n = d.attention, d.config.top
    heads = r.heads
    top = top_heads(heads, "label_attention", top_n)
    plot_attention(folder, r, top, title)
    b, pm, ind = top.iloc[0], top_heads(heads, "pm", 1).iloc[0], top_heads(heads, "induction", 1).iloc[0]
    blocks: list = [
        Figure(
            folder.path / "label_attention_default.png",
            f"Attention from readout slots to earlier label tokens, per head (default labels). {b['name']} puts "
            f"{b.label_attention:.2f} of its readout attention on earlier labels ({b.label_attention_flipped:.2f} "
            f"with flipped labels); the mean over heads is {heads.label_attention.mean():.2f}.",
        ),
        Figure(
            folder.path / "pm_default.png",
            f"PM score: attention to the labels of demonstrations whose input has the query's class, minus the other "
            f"labels. Highest: {pm['name']} ({pm.pm:.2f} with correct labels, {pm.pm_flipped:.2f} with flipped ones). "
            "A head that keeps its PM under flipped labels selects demonstrations by their input; one whose PM "
            "changes sign selects label tokens by the word they show.",
        ),
        Figure(
            folder.path / "induction.png",
            f"Induction score on repeated random tokens. Highest: {ind['name']} ({ind.induction:.2f}); "
            f"{b['name']}, the top label-attention head, scores {b.induction:.2f}.",
        ),
    ]
    if r.saliency is not None:
        sl = r.saliency.layers[r.saliency.layers.condition == "default"]
        wp, pq = sl.loc[sl.S_wp.idxmax()], sl.loc[sl.S_pq.idxmax()]
        blocks.append(
            Figure(
                folder.path / "saliency_layers.png",
                f"Attention saliency per layer (Wang et al.): text->label flow S_wp peaks at layer "
                f"{int(wp.layer)} ({wp.S_wp:.3g}), label->query flow S_pq at layer {int(pq.layer)} "
                f"({pq.S_pq:.3g}). Labels gathering their inputs early and the query reading labels "
                "late is the anchor picture.",
            )
        )
    sel = [(int(l), int(h)) for l, h in zip(top.layer, top["head"])]
    bd = r.batches[0]
    pats = context_patterns(loaded.model, bd, 0, sel, d.runs[0] if d.runs is not None else None)
    blocks.append(
        View(
            attention_view(bd, 0, loaded.tokenizer, pats, list(top.name)),
            f"Interactive: the {len(sel)} top label-attention heads on context 0 (default labels). Hover a "
            "head, then a [Q] token, to see where the readout slot looks; [L] marks label tokens.",
        )
    )
    blocks += (
        attattr_blocks(folder, d, title)
        if d.attattr is not None
        else [Note(integrated_gradients_pointer(loaded.name, d.config.task), pointer=True)]
    )
    return Section("Who looks at labels", tuple(blocks))


def attattr_blocks(folder: RunFolder, d: ReportData, title: str) -> list:
    """Raw attention beside attention attribution (AttAttr) for the heads with most label-token attribution."""
    g, n = d.attattr, d.config.n_patch
    plot_label_vs_input(folder, g, title)
    top = top_label_heads(g, d.config.top)
    best = top.iloc[0]
    lab_in = g[g.group.isin(["label", "input"]) & (g.condition == "flipped")].groupby("group").attribution.sum()
    return [
        Figure(
            folder.path / "attribution_label_vs_input.png",
            f"Attention attribution (AttAttr, integrated gradients over attention from a uniform-attention start, "
            f"m = {d.config.attribution_steps}) at the readout slot, summed over heads: label vs input tokens per layer, "
            f"on the {n} patching contexts. Unlike raw attention it adds up to the change of the shown label's logit "
            f"difference. Over all layers, flipped labels: label tokens {lab_in.get('label', 0.0):+.3f}, input tokens "
            f"{lab_in.get('input', 0.0):+.3f}.",
        ),
        Table(
            top.reset_index(drop=True),
            f"Raw attention vs attribution on label tokens at the readout slot. {best['name']} carries the most "
            f"(|AttAttr| {abs(best.attribution_flipped):.3f} with flipped labels) while putting "
            f"{best.attention_flipped:.2f} of its attention there; `mechicl attribute` adds path IG and the "
            "comparison with exact patching.",
        ),
    ]


def integrated_gradients_pointer(model: str, task: str) -> str:
    """Section 3's pointer when the report ran without ``--attribution``."""
    return (
        f"Attention attribution (AttAttr, integrated gradients over attention) is off in this run: add "
        f"`--attribution` (it costs many forwards per layer), or run `mechicl attribute --model {model} --task {task}` "
        "for AttAttr and path IG beside exact and first-order patching."
    )


# ------------------------------------------------------------- 4. patching


def patching_section(folder: RunFolder, d: ReportData, title: str) -> Section:
    p = d.patch
    write_patch_results(folder, [r for r in p.results if r.kind != "resid"], title)
    blocks: list = []
    for r in p.results:
        t = r.table()
        if r.kind == "resid":
            blocks.append(resid_figure(folder, r, t, p.window, title))
            continue
        best = t.loc[t.effect.abs().idxmax()]
        a0, a1 = r.axes
        role = f" ({best.role})" if "role" in t.columns else ""
        blocks.append(
            Figure(
                folder.path / f"{r.kind}_denoise.png",
                f"Denoising: patch {r.description} from the correct-label run into the flipped-label run "
                f"(0 = flipped run, 1 = correct run). Largest: {a0} {int(best[a0])}, {a1} {int(best[a1])}"
                f"{role} restores {best.effect:+.2f}; {int((t.effect.abs() > 0.1).sum())} of {len(t)} "
                f"cells move it by more than 0.1.",
            )
        )
    a, ag = p.attribution, p.agreement
    sc = scatter(
        a,
        "exact",
        "attribution",
        folder / "attribution_vs_exact.png",
        label="name",
        diagonal=True,
        title=f"{title}: attribution patching vs exact patching, head outputs",
        xlabel="exact patching (normalised)",
        ylabel="attribution estimate",
    )
    blocks.append(
        Figure(
            sc,
            f"Attribution patching (2 forwards + 1 backward) against exact patching of each head's "
            f"output: Spearman {ag['spearman']:.2f}, Pearson {ag['pearson']:.2f}, top-{int(ag['k'])} "
            f"overlap {ag['topk_overlap']:.2f}. Points far from the diagonal are heads where the "
            f"linear estimate misleads. Pair: {p.description}.",
        )
    )
    return Section("Who carries the label information causally", tuple(blocks))


def resid_figure(folder: RunFolder, r: PatchResult, t: pd.DataFrame, window: tuple[int, int], title: str) -> Figure:
    """The residual stream x position sweep, drawn over the positions it ran (absolute positions on the axis)."""
    lo, hi = window
    folder.csv("resid_denoise.csv", t)
    ticks = [f"{p}:{role[:3]}" for p, role in zip(range(lo, hi), r.pos_roles[lo:hi])]
    path = heatmap(
        r.values[:, lo:hi].float().numpy(),
        folder / "resid_denoise.png",
        f"{title}: residual stream by position, denoise; 0 = flipped run, 1 = correct run",
        xlabel="pos",
        xticklabels=ticks,
        center=0.0,
    )
    t = t[t.computed]
    best = t.loc[t.effect.abs().idxmax()]
    return Figure(
        path,
        f"Denoising the residual stream entering each block at one position (positions {lo}-{hi - 1}: "
        f"the last examples and the query; earlier positions not run). Largest: layer {int(best.layer)}, "
        f"pos {int(best.pos)} ({best.role}) restores {best.effect:+.2f}; "
        f"{int((t.effect.abs() > 0.5).sum())} of {len(t)} cells restore more than half. Look for high "
        "cells that move from label positions to the readout slot with depth: that is where the label "
        "information travels.",
    )


# ------------------------------------------------------------- 5. validation


def validation_section(folder: RunFolder, d: ReportData, title: str) -> Section:
    h = d.heads
    if h.heads.empty:
        return Section("Validation", (Note("The head finder confirmed no candidate heads on this run."),))
    top = h.heads.iloc[0]
    name = f"L{int(top.layer)}H{int(top['head'])}"
    ctrl1 = h.control[h.control["size"] == 1]
    gap = h.baseline.get("gap", np.nan)
    if not gap > 0:
        return Section(
            "Validation",
            (
                Note(
                    f"No validation: without ablation the correct-vs-flipped accuracy gap is {gap:.2f} on the "
                    f"{h.config.n_eval} held-out contexts, so there is no gap for an ablation to reduce (heads.csv, sets.csv "
                    "hold the patching screen)."
                ),
            ),
        )
    path = histogram(
        ctrl1.gap_reduction.to_numpy(),
        folder / "ablation_control.png",
        [(name, float(top.gap_reduction_mean))],
        (float(top.gap_reduction_ci_low), float(top.gap_reduction_ci_high)),
        f"{title}: gap reduction when ablating {name} vs every other head alone",
        "gap reduction (correct - flipped accuracy gap closed)",
    )
    cap = (
        f"Mean-ablating {name} at the query readout slot on {h.config.n_eval} held-out contexts reduces the "
        f"correct-vs-flipped accuracy gap by {top.gap_reduction_mean:+.2f} [{top.gap_reduction_ci_low:+.2f}, "
        f"{top.gap_reduction_ci_high:+.2f}]. The grey histogram is every other head ablated alone ({len(ctrl1)} heads): "
        f"its 97.5th percentile is {top.control_ci_high:+.2f}, and its control p (1 + heads that reach {name}'s "
        f"value, over 1 + {int(top.n_other)}) is {mc_p(top.control_p, top.n_other)}. Costs: correct-label accuracy "
        f"changes by {top.d_acc_correct_mean:+.2f}, zero-shot accuracy by {top.d_acc_zero_shot_mean:+.2f}. "
        f"Without ablation: accuracy {h.baseline.get('acc_correct', np.nan):.2f} correct, "
        f"{h.baseline.get('acc_flipped', np.nan):.2f} flipped."
    )
    cols = [
        "layer",
        "head",
        "patch_denoise",
        "readout_patch_denoise",
        "gap_reduction_mean",
        "gap_reduction_ci_low",
        "gap_reduction_ci_high",
        "control_ci_high",
        "control_p",
        "d_acc_correct_mean",
        "d_acc_zero_shot_mean",
    ]
    cand = h.heads.assign(control_p=[mc_p(p, n) for p, n in zip(h.heads.control_p, h.heads.n_other)])
    sets = h.sets.assign(control_p=[mc_p(p, n) for p, n in zip(h.sets.control_p, h.sets.n_draws)])
    sets = sets[
        [
            "heads",
            "gap_reduction",
            "control_mean",
            "control_ci_low",
            "control_ci_high",
            "control_p",
            "n_draws",
            "d_acc_correct",
            "d_acc_zero_shot",
        ]
    ]
    return Section(
        "Validation",
        (
            Figure(path, cap),
            Table(
                cand[[c for c in cols if c in cand.columns]],
                "Confirmed candidate heads, ranked by exact denoising effect (heads.csv).",
            ),
            Table(
                sets,
                f"Top-n head sets against {h.config.n_control} random same-size sets "
                "(size 1: every other head) (sets.csv).",
            ),
        ),
    )


# ------------------------------------------------------------- 6. prior vs context


def prior_section(folder: RunFolder, d: ReportData, title: str) -> Section:
    ph = d.prior_vs_context[d.prior_vs_context.kind == "head"].rename(columns={"component": "name"})
    path = scatter(
        ph,
        "prior",
        "context",
        folder / "prior_vs_context.png",
        label="name",
        title=f"{title}: each head's direct effect, prior part vs context part",
        xlabel="prior (direct effect that follows the zero-shot label)",
        ylabel="context (direct effect that flips with the shown label)",
    )
    c, p = ph.loc[ph.side.idxmax()], ph.loc[ph.side.idxmin()]
    cap = (
        f"Per-head decomposition of the direct logit effect into a part that follows the labels shown in context "
        f"and a part that stays with the model's zero-shot prediction. Most on the context side: {c['name']} "
        f"(context {c.context:+.2f}, prior {c.prior:+.2f}); most on the prior side: {p['name']} (context "
        f"{p.context:+.2f}, prior {p.prior:+.2f}). Heads up and left fight the prior on the context's behalf."
    )
    return Section("Prior vs context", (Figure(path, cap),))


def build_sections(folder: RunFolder, loaded: LoadedModel, d: ReportData, title: str) -> list[Section]:
    return [
        behavior_section(folder, d, title),
        lens_section(folder, d, title),
        attention_section(folder, loaded, d, title),
        patching_section(folder, d, title),
        validation_section(folder, d, title),
        prior_section(folder, d, title),
        circuit_section(d.config.findings, d.config.circuit, loaded.name, d.config.task),
    ]


# ------------------------------------------------------------- 8. run facts


def versions() -> str:
    out = []
    for p in PACKAGES:
        try:
            out.append(f"{p} {md.version(p)}")
        except md.PackageNotFoundError:
            continue
    return ", ".join(out + [f"python {platform.python_version()}"])


def facts_section(loaded: LoadedModel, cfg: ReportConfig, stages: pd.DataFrame, command: str) -> Section:
    facts = pd.DataFrame(
        [
            ("model", f"{loaded.name} ({loaded.source})"),
            ("task", cfg.task),
            ("seed", str(cfg.seed)),
            ("forwards (all stages)", f"{int(stages.forwards.sum())} over {int(stages.rows.sum())} context rows"),
            ("wall time (all stages, model load excluded)", f"{stages.seconds.sum():.0f} s"),
            ("package versions", versions()),
            ("re-run", command),
        ],
        columns=["fact", "value"],
    )
    note = (
        "A forward = one call of the model's last block: a partial re-run that starts mid-model or only runs "
        "the query token counts as one. Stages do not share cached runs: attention, lens and DLA each run their "
        "own forwards on the same contexts."
    )
    return Section(
        "Run facts",
        (
            Table(facts, "Run facts."),
            Table(stages, "Stages: contexts, wall seconds and forwards (stages.csv). " + note, 1),
        ),
    )
