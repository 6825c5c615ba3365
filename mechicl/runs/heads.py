"""`mechicl heads`: the head finder on disjoint context draws, its tables, heatmaps and summary."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mechicl.analysis.heads.old_finder import HeadFinderConfig, HeadFinderResult, find_heads, p_text
from mechicl.data.batches import ablation_batches
from mechicl.data.pairs import pair_for
from mechicl.data.prompts import sample_contexts
from mechicl.data.task import Task
from mechicl.models.base import LoadedModel
from mechicl.runs.folder import RunFolder, md_table
from mechicl.viz.plots import head_map

NAN = float("nan")


def find_heads_for(loaded: LoadedModel, task: Task, cfg: HeadFinderConfig, progress: bool = True) -> HeadFinderResult:
    """Screen on ``cfg.n_screen`` contexts drawn with ``cfg.seed``; validate on ``cfg.n_eval`` others (seed + 1).
    The result's config names ``loaded.name`` and ``task.name``, whatever ``cfg.model`` / ``cfg.task`` said."""
    pair = pair_for(loaded, task, cfg.n_screen, cfg.n_examples, seed=cfg.seed)
    ids = sample_contexts(task, cfg.n_eval, cfg.n_examples, seed=cfg.seed + 1)
    held_out = ablation_batches(
        task, loaded.tokenizer, ids, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos, seed=cfg.seed
    )
    return find_heads(loaded.model, pair, held_out, cfg, progress, name=loaded.name)


def _intro(result: HeadFinderResult) -> list[str]:
    c, b, v = result.config, result.baseline, result.verdict
    return [
        f"# Label-aggregation heads: {result.model} on {result.task}",
        "",
        v.line,
        "",
        f"Rule: {v.rule}. The table ranks candidates by exact denoising effect; the first row is not "
        "necessarily the head found.",
        "",
        f"Screen: attribution patching (all positions) and exact readout-slot patching of every head on {c.n_screen} "
        f"contexts of k = {c.n_examples - 1} demonstrations + 1 query (correct vs flipped labels); {len(result.heads)} candidates confirmed with "
        f"exact patching (all positions, both directions). Validation on {c.n_eval} held-out contexts: ablation of "
        f"head outputs at the query readout slot; random control = {c.n_control} same-size random head sets per size "
        f"(every possible set where there are no more; always for size 1; {c.ablation} ablation). "
        f"Seed {c.seed}. Wall time {result.seconds:.0f} s.",
        "",
        f"Without ablation: accuracy (vs true label) {b.get('acc_correct', NAN):.3f} with correct labels, "
        f"{b.get('acc_flipped', NAN):.3f} with flipped labels (gap {b.get('gap', NAN):.3f}); "
        f"P(true) {b.get('p_correct', NAN):.3f} vs {b.get('p_flipped', NAN):.3f}; "
        f"zero-shot accuracy (query alone) {b.get('acc_zero_shot', NAN):.3f}.",
        "",
        "Patching effects are normalised logit differences (denoise: 0 = corrupted, 1 = clean restored; "
        "noise: change from 1, negative = the head's corrupted output destroys the clean answer).",
        "",
        f"Gap reduction vs other heads: the 97.5th percentile of every other head's gap reduction ({c.ablation} "
        "ablation, each head alone) and the share of heads that reach this head's value (p, counting the head itself; "
        "written p <= 1/(1 + other heads) at that floor, when no other head reaches it).",
        "",
    ]


def _head_rows(result: HeadFinderResult, n: int) -> pd.DataFrame:
    a = result.config.ablation
    other = "zero" if a == "mean" else "mean"
    return pd.DataFrame(
        [
            {
                "rank": r.rank,
                "head": f"L{r.layer}H{r.head}",
                "attribution": f"{r.attribution:+.3f}",
                "patch denoise": f"{r.patch_denoise:+.3f}",
                "patch noise": f"{r.patch_noise:+.3f}",
                "readout denoise": f"{r.readout_patch_denoise:+.3f}",
                f"gap red. ({a} abl.) [95% CI]": f"{getattr(r, f'gap_reduction_{a}'):+.3f} [{r.gap_reduction_ci_low:+.2f}, "
                f"{r.gap_reduction_ci_high:+.2f}]",
                f"gap red. ({other})": f"{getattr(r, f'gap_reduction_{other}'):+.3f}",
                "vs other heads: 97.5% / p": f"{r.control_ci_high:+.3f} / {p_text(r.control_p, int(r.n_other))}",
                "Δacc correct": f"{getattr(r, f'd_acc_correct_{a}'):+.3f}",
                "Δacc zero-shot": f"{getattr(r, f'd_acc_zero_shot_{a}'):+.3f}",
                "FV CIE": f"{r.fv_cie:+.4f}",
            }
            for r in result.heads.head(n).itertuples()
        ]
    )


def _set_rows(result: HeadFinderResult) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "set": r.heads,
                "gap reduction [bootstrap 95% CI]": f"{r.gap_reduction:+.3f} [{r.gap_reduction_ci_low:+.2f}, {r.gap_reduction_ci_high:+.2f}]",
                "gap red. in P(true)": f"{r.gap_reduction_ptrue:+.3f}",
                "Δacc correct": f"{r.d_acc_correct:+.3f}",
                "Δacc zero-shot": f"{r.d_acc_zero_shot:+.3f}",
                "random control mean": f"{r.control_mean:+.3f}",
                "control 2.5-97.5%": f"[{r.control_ci_low:+.3f}, {r.control_ci_high:+.3f}]",
                "p (control >= set)": p_text(r.control_p, int(r.n_draws)),
            }
            for r in result.sets.itertuples()
        ]
    )


def heads_markdown(result: HeadFinderResult, n: int = 12) -> str:
    """The ranked table, the set table and the key numbers as markdown."""
    lines = _intro(result) + [
        md_table(_head_rows(result, n)),
        "",
        f"## Top-n head sets vs random sets of the same size ({result.config.ablation} ablation)",
        "",
        md_table(_set_rows(result)),
    ]
    a = result.agreement
    if a:
        lines += [
            "",
            f"Attribution vs exact patching: Spearman {a.get('spearman_candidates', NAN):.2f} over the "
            f"{len(result.heads)} candidates (all positions), {a.get('spearman_readout', NAN):.2f} over all heads "
            f"at the readout slot (top-{int(a.get('k', 0))} overlap {a.get('topk_overlap_readout', NAN):.2f}).",
        ]
    lines += ["", "Stage timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result.timings.items())]
    return "\n".join(lines) + "\n"


def write_heads(result: HeadFinderResult, out: Path) -> RunFolder:
    """heads.csv, all_heads.csv, sets.csv, control.csv, heatmaps, summary.md and config.json into ``out``."""
    folder = RunFolder(out)
    for name in ("heads", "all_heads", "sets", "control"):
        folder.csv(f"{name}.csv", getattr(result, name))
    title = f"{result.model} on {result.task}"
    for col, label in [
        ("attribution", "attribution patching, head outputs (all positions), denoise"),
        ("readout_patch_denoise", "exact patching, head output at the readout slot, denoise"),
        ("fv_cie", "function-vector causal indirect effect (ΔP(true), shuffled labels)"),
    ]:
        head_map(folder, result.all_heads, col, f"{col}.png", f"{title}: {label}")
    folder.text("summary.md", heads_markdown(result))
    folder.json("config.json", result.config)
    return folder
