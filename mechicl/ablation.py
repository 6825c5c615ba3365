"""Head ablation at the readout slot, the random-head-set control, function-vector effects, and the head finder.

**Ablation.** A head is ablated by replacing its output (``hook_z``) at the query
readout slot of every context: *zero* ablation writes 0, *mean* ablation writes its
mean output at that slot over the clean (correct-label) contexts. Only the query
slot changes, so ``ReadoutStepper`` re-runs one token per context per ablation.

**Gap reduction** (Halawi et al., 2024, "Overthinking the truth"). With accuracy
measured against the *true* label at the query slot::

    gap_reduction = 1 - (acc_correct - acc_flipped_ablated) / (acc_correct - acc_flipped)

0 = the ablation leaves flipped-label contexts as they were, 1 = it closes the gap
to correct-label contexts entirely (the model stops following the flipped labels).
``d_acc_correct`` is what the same ablation does to correct-label contexts, and
``d_acc_zero_shot`` what it does to the zero-shot prediction (the query alone, k = 0,
ablated at its readout slot with the same replacement): a head that carries in-context
label information, not the prior, leaves it near 0.

**Random control.** Every head set is compared with many random sets of the same
size drawn (seeded) from the other heads (exact when there are few such sets: for a single head,
every other head once); reported are the control mean, the 2.5-97.5%
range of the draws (``control_ci_low/high``) and the one-sided empirical p-value of
the set against the draws.

**Causal indirect effect** (Todd et al., 2024, function vectors). Each head's mean
output at the query slot over correct-label contexts is patched into contexts whose
demonstration labels are shuffled; the effect is the rise in P(true label)
(probabilities over the label set), with a t-interval over contexts.

**Head finder** (``find_heads``): attribution patching screens every head, exact
patching confirms the top candidates, ablation on held-out contexts validates them
against the random control. Result: ``HeadFinderResult`` with tidy tables.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.models import DEFAULT_MODEL
from mechicl.pairs import pair_for
from mechicl.patching import Patcher, plot_heatmap
from mechicl.prompts import PromptBatch, build_prompt_batch, sample_contexts
from mechicl.stats import t_interval
from mechicl.stepper import ReadoutStepper, bridge_of
from mechicl.tasks import Task

ABLATIONS = ("zero", "mean")
Head = tuple[int, int]


def head_masks(sets: Sequence[Sequence[Head]], n_layers: int, n_heads: int) -> Bool[Tensor, "n layer head"]:
    """One boolean (layer, head) mask per head set."""
    m = torch.zeros(len(sets), n_layers, n_heads, dtype=torch.bool)
    for i, s in enumerate(sets):
        for l, h in s:
            m[i, l, h] = True
    return m


def fmt_heads(heads: Sequence[Head]) -> str:
    return " ".join(f"L{l}H{h}" for l, h in heads)


def shuffled_labels(batch: PromptBatch, seed: int) -> Int[Tensor, "batch example"]:
    """Each context's demonstration labels permuted among themselves (seeded); the query keeps its label."""
    rng = np.random.default_rng(seed)
    shown = batch.true_labels.clone().numpy()
    for r in range(shown.shape[0]):
        shown[r, :-1] = rng.permutation(shown[r, :-1])
    return torch.as_tensor(shown)


def gap_reduction(acc_correct: Any, acc_flipped: Any, acc_flipped_ablated: Any) -> Any:
    """Halawi et al.'s gap reduction; NaN where there is no gap (acc_correct <= acc_flipped)."""
    gap = np.asarray(acc_correct, dtype=float) - np.asarray(acc_flipped, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1.0 - (np.asarray(acc_correct, dtype=float) - np.asarray(acc_flipped_ablated, dtype=float)) / gap
    return np.where(gap > 0, out, np.nan)


# ---------------------------------------------------------------- ablator ---


class HeadAblator:
    """Ablations and function-vector effects on one set of held-out contexts.

    Holds a ``ReadoutStepper`` for the correct-label and flipped-label renderings, the
    zero-shot rendering (each query alone, k = 0) and, on first use, a shuffled-label
    one. Cost: one forward per rendering on construction; each ablated head set then costs one one-token step per context
    (KV path) or one forward (fallback). Memory: the steppers' prefix caches.
    """

    def __init__(self, model: Any, task: Task, tokenizer: Any, example_ids: Int[Tensor, "batch example"], *,
                 n_ctx: int, prepend_bos: bool, seed: int = 0, max_rows: int = 256) -> None:
        self.model = bridge_of(model)
        self.task, self.tokenizer, self.ids = task, tokenizer, example_ids
        self.n_ctx, self.prepend_bos, self.seed, self.max_rows = n_ctx, prepend_bos, seed, max_rows
        self.L, self.H = int(self.model.cfg.n_layers), int(self.model.cfg.n_heads)
        kw = dict(n_ctx=n_ctx, prepend_bos=prepend_bos, seed=seed)
        self.correct = ReadoutStepper(self.model, build_prompt_batch(task, tokenizer, example_ids, "default", **kw), max_rows=max_rows)
        self.flipped = ReadoutStepper(self.model, build_prompt_batch(task, tokenizer, example_ids, "flipped", **kw), max_rows=max_rows)
        self.zero_shot = ReadoutStepper(self.model, build_prompt_batch(task, tokenizer, example_ids[:, -1:], "default", **kw),
                                        max_rows=max_rows)
        self._shuffled: ReadoutStepper | None = None
        self.target = self.correct.batch.true_labels[:, -1]  # true label of each query
        self.mean_z = self.correct.z.mean(0)  # [layer, head, d_head]: mean output at the query slot, clean distribution
        self.base = {c: {k: v[0] for k, v in self._score(getattr(self, c).base_logits[None]).items()}
                     for c in ("correct", "flipped", "zero_shot")}

    @property
    def n_contexts(self) -> int:
        return int(self.target.shape[0])

    @property
    def shuffled(self) -> ReadoutStepper:
        if self._shuffled is None:
            b = self.correct.batch
            shown = shuffled_labels(b, self.seed)
            batch = build_prompt_batch(self.task, self.tokenizer, self.ids, "random", n_ctx=self.n_ctx,
                                       prepend_bos=self.prepend_bos, shown_labels=shown)
            self._shuffled = ReadoutStepper(self.model, batch, max_rows=self.max_rows)
        return self._shuffled

    def _score(self, logits: Float[Tensor, "n batch n_labels"]) -> dict[str, np.ndarray]:
        """Per-context correctness and P(true label) against the query's true label."""
        p = torch.softmax(logits.double(), -1)
        tgt = self.target.expand(logits.shape[0], -1)
        return {
            "correct": (logits.argmax(-1) == tgt).numpy(),
            "p_true": p.gather(-1, tgt[..., None])[..., 0].numpy(),
        }

    def _source(self, ablation: str) -> Tensor | None:
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
        return None if ablation == "zero" else self.mean_z

    def ablate(self, sets: Sequence[Sequence[Head]], ablation: str = "mean", conditions: Sequence[str] = ("correct", "flipped"),
               progress: bool = False) -> dict[str, dict[str, np.ndarray]]:
        """Per-context scores ``[n_sets, batch]`` under each head set's ablation, per condition."""
        masks = head_masks(sets, self.L, self.H)
        src = self._source(ablation)
        return {c: self._score(getattr(self, c).run(masks, src, progress=progress)) for c in conditions}

    def gap_table(self, sets: Sequence[Sequence[Head]], ablation: str = "mean", n_boot: int = 1000, seed: int = 0,
                  with_correct: bool = True) -> pd.DataFrame:
        """Gap reduction (accuracy and P(true)) with a bootstrap CI over contexts; Δ correct-label and zero-shot accuracy."""
        conds = ("correct", "flipped", "zero_shot") if with_correct else ("flipped",)
        res = self.ablate(sets, ablation, conds)
        bc, bf = self.base["correct"], self.base["flipped"]
        acc_c, acc_f = bc["correct"].mean(), bf["correct"].mean()
        p_c, p_f = bc["p_true"].mean(), bf["p_true"].mean()
        fa = res["flipped"]["correct"]  # [n, batch]
        gr = gap_reduction(acc_c, acc_f, fa.mean(1))
        gr_p = gap_reduction(p_c, p_f, res["flipped"]["p_true"].mean(1))
        lo = hi = np.full(len(sets), np.nan)
        if n_boot > 0:  # paired bootstrap over contexts
            rng = np.random.default_rng(seed)
            idx = rng.integers(0, self.n_contexts, size=(n_boot, self.n_contexts))
            boot = gap_reduction(bc["correct"][idx].mean(1)[None], bf["correct"][idx].mean(1)[None], fa[:, idx].mean(2))
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                lo, hi = np.nanpercentile(boot, 2.5, axis=1), np.nanpercentile(boot, 97.5, axis=1)
        df = pd.DataFrame({
            "heads": [fmt_heads(s) for s in sets],
            "size": [len(s) for s in sets],
            "ablation": ablation,
            "gap_reduction": gr,
            "gap_reduction_ci_low": lo,
            "gap_reduction_ci_high": hi,
            "gap_reduction_p": gr_p,
            "acc_flipped_ablated": fa.mean(1),
        })
        if with_correct:
            df["d_acc_correct"] = res["correct"]["correct"].mean(1) - acc_c
            df["d_acc_zero_shot"] = res["zero_shot"]["correct"].mean(1) - self.base["zero_shot"]["correct"].mean()
        return df

    def random_control(self, size: int, n_draws: int, seed: int = 0, exclude: Sequence[Head] = (),
                       ablation: str = "mean") -> pd.DataFrame:
        """Gap reduction of ``n_draws`` random head sets of ``size`` heads (none from ``exclude``); seeded.

        When the pool has no more than ``n_draws`` sets of that size (always for ``size == 1``:
        every other head once), the control is exact instead: each possible set once.
        """
        pool = [(l, h) for l in range(self.L) for h in range(self.H) if (l, h) not in set(exclude)]
        if size > len(pool):
            raise ValueError(f"cannot draw {size} heads from a pool of {len(pool)}")
        if size == 1 or math.comb(len(pool), size) <= n_draws:
            sets = [list(c) for c in itertools.combinations(pool, size)]
        else:
            rng = np.random.default_rng([seed, size])
            sets = [sorted(pool[i] for i in rng.choice(len(pool), size=size, replace=False)) for _ in range(n_draws)]
        n_draws = len(sets)
        df = self.gap_table(sets, ablation, n_boot=0, with_correct=False)
        df.insert(0, "draw", np.arange(n_draws))
        return df.drop(columns=["gap_reduction_ci_low", "gap_reduction_ci_high"])

    def function_vector_effects(self, progress: bool = False) -> pd.DataFrame:
        """Todd et al.'s causal indirect effect of every head (mean clean output -> shuffled-label contexts)."""
        st = self.shuffled
        heads = [(l, h) for l in range(self.L) for h in range(self.H)]
        tgt = self.target
        base = torch.softmax(st.base_logits.double(), -1).gather(-1, tgt[:, None])[:, 0].numpy()
        logits = st.run(head_masks([[x] for x in heads], self.L, self.H), self.mean_z, progress=progress)
        p = torch.softmax(logits.double(), -1).gather(-1, tgt.expand(len(heads), -1)[..., None])[..., 0].numpy()
        rows = []
        for i, (l, h) in enumerate(heads):
            m, lo, hi = t_interval(p[i] - base)
            rows.append({"layer": l, "head": h, "fv_cie": m, "fv_cie_ci_low": lo, "fv_cie_ci_high": hi})
        return pd.DataFrame(rows)


def summarize_control(value: float, draws: np.ndarray) -> dict[str, float]:
    """Control mean, 2.5-97.5% range of the draws, and the one-sided empirical p-value of ``value``."""
    d = draws[~np.isnan(draws)]
    if d.size == 0:
        return {"control_mean": np.nan, "control_ci_low": np.nan, "control_ci_high": np.nan, "control_p": np.nan, "n_draws": 0}
    return {
        "control_mean": float(d.mean()),
        "control_ci_low": float(np.percentile(d, 2.5)),
        "control_ci_high": float(np.percentile(d, 97.5)),
        "control_p": float((1 + (d >= value).sum()) / (1 + d.size)),
        "n_draws": int(d.size),
    }


# ------------------------------------------------------------ head finder ---


@dataclass(frozen=True)
class HeadFinderConfig:
    """The head finder: screen -> confirm (exact patching) -> validate (ablation vs random sets).

    Screen: attribution patching of every head's output at all positions, plus exact
    patching at the readout slot (cheap one-token re-runs). Candidates: the top third
    of ``n_candidates`` by exact readout-slot effect, filled up by attribution rank.

    Cost on ``n_examples``-example contexts: attribution 2 forwards + 1 backward of
    ``n_screen`` contexts; exact all-position head patching of ``n_candidates`` heads
    in both directions (<= ``2 * n_candidates`` forwards of ``n_screen`` contexts, fewer
    for late layers); one forward of ``n_eval`` held-out contexts for each of the
    correct, flipped and shuffled renderings; then one-token re-runs for every
    ablation, control draw and head effect. Memory: the prefix KV caches of the
    held-out contexts plus ``max_rows`` rows of one step.
    """

    model: str = DEFAULT_MODEL
    task: str = "vader-words"
    n_examples: int = 17  # examples per context, the last is the query (k = n_examples - 1 observed)
    n_screen: int = 16
    n_eval: int = 64
    n_candidates: int = 12
    set_sizes: tuple[int, ...] = (1, 2, 4)
    n_control: int = 200
    ablation: str = "mean"  # the ablation the control and the headline use; both are reported per head
    seed: int = 0
    max_rows: int = 256

    def __post_init__(self) -> None:
        if self.n_examples < 2 or self.n_screen < 1 or self.n_eval < 2 or self.n_candidates < 1:
            raise ValueError("need n_examples >= 2, n_screen >= 1, n_eval >= 2, n_candidates >= 1")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}")


@dataclass(frozen=True)
class HeadFinderResult:
    """Tables from ``find_heads``.

    ``heads``: the confirmed candidates, ranked by exact denoising effect (columns: rank,
      layer, head, attribution, patch_denoise, patch_noise, readout_patch_denoise,
      readout_patch_noise, gap_reduction(_zero/_mean), gap_reduction_ci_low/high,
      d_acc_correct(_zero/_mean), d_acc_zero_shot(_zero/_mean), fv_cie, and control_ci_high /
      control_p: the head's gap reduction against every other head's, each ablated alone).
    ``all_heads``: every (layer, head): attribution, exact readout-slot patching, gap reduction
      when ablated alone (the headline ablation), FV effect.
    ``sets``: the top-n sets: gap reduction with bootstrap CI, d_acc_correct, d_acc_zero_shot and the
      random-control summary (control_mean, control_ci_low/high, control_p, n_draws).
    ``control``: every control draw. ``baseline``: accuracies without ablation.
    ``agreement``: attribution vs exact (Spearman, top-k overlap). ``timings``: seconds per stage.
    """

    config: HeadFinderConfig
    model: str
    task: str
    heads: pd.DataFrame = field(repr=False)
    all_heads: pd.DataFrame = field(repr=False)
    sets: pd.DataFrame = field(repr=False)
    control: pd.DataFrame = field(repr=False)
    baseline: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    stepper_mode: str = ""

    @property
    def top_heads(self) -> list[Head]:
        return [(int(r.layer), int(r.head)) for r in self.heads.itertuples()]

    @property
    def seconds(self) -> float:
        return float(sum(self.timings.values()))

    def markdown(self, n: int = 12) -> str:
        """The ranked table, the set table and the key numbers as markdown."""
        c, b = self.config, self.baseline
        lines = [
            f"# Label-aggregation heads: {self.model} on {self.task}",
            "",
            f"Screen: attribution patching (all positions) and exact readout-slot patching of every head on {c.n_screen} "
            f"contexts x {c.n_examples} examples (correct vs flipped labels); {len(self.heads)} candidates confirmed with "
            f"exact patching (all positions, both "
            f"directions). Validation on {c.n_eval} held-out contexts: ablation of head outputs at the query readout "
            f"slot; random control = {c.n_control} same-size random head sets per size (every possible set where there are no more; always for size 1; "
            f"{c.ablation} ablation). "
            f"Seed {c.seed}. Wall time {self.seconds:.0f} s.",
            "",
            f"Without ablation: accuracy (vs true label) {b.get('acc_correct', float('nan')):.3f} with correct labels, "
            f"{b.get('acc_flipped', float('nan')):.3f} with flipped labels (gap {b.get('gap', float('nan')):.3f}); "
            f"P(true) {b.get('p_correct', float('nan')):.3f} vs {b.get('p_flipped', float('nan')):.3f}; "
            f"zero-shot accuracy (query alone) {b.get('acc_zero_shot', float('nan')):.3f}.",
            "",
            "Patching effects are normalised logit differences (denoise: 0 = corrupted, 1 = clean restored; "
            "noise: change from 1, negative = the head's corrupted output destroys the clean answer).",
            "",
            f"Gap reduction vs other heads: the 97.5th percentile of every other head's gap reduction ({c.ablation} "
            "ablation, each head alone) and the share of heads that reach this head's value (p).",
            "",
            "| rank | head | attribution | patch denoise | patch noise | readout denoise | gap red. (mean abl.) [95% CI] | gap red. (zero) | vs other heads: 97.5% / p | Δacc correct | Δacc zero-shot | FV CIE |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.heads.head(n).itertuples():
            lines.append(
                f"| {r.rank} | L{r.layer}H{r.head} | {r.attribution:+.3f} | {r.patch_denoise:+.3f} | {r.patch_noise:+.3f} | "
                f"{r.readout_patch_denoise:+.3f} | {r.gap_reduction_mean:+.3f} [{r.gap_reduction_ci_low:+.2f}, {r.gap_reduction_ci_high:+.2f}] | "
                f"{r.gap_reduction_zero:+.3f} | {r.control_ci_high:+.3f} / {r.control_p:.3f} | {r.d_acc_correct_mean:+.3f} | {r.d_acc_zero_shot_mean:+.3f} | {r.fv_cie:+.4f} |"
            )
        lines += [
            "",
            f"## Top-n head sets vs random sets of the same size ({c.ablation} ablation)",
            "",
            "| set | gap reduction [bootstrap 95% CI] | gap red. in P(true) | Δacc correct | Δacc zero-shot | random control mean | control 2.5-97.5% | p (control >= set) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.sets.itertuples():
            lines.append(
                f"| {r.heads} | {r.gap_reduction:+.3f} [{r.gap_reduction_ci_low:+.2f}, {r.gap_reduction_ci_high:+.2f}] | "
                f"{r.gap_reduction_p:+.3f} | {r.d_acc_correct:+.3f} | {r.d_acc_zero_shot:+.3f} | {r.control_mean:+.3f} | [{r.control_ci_low:+.3f}, {r.control_ci_high:+.3f}] | {r.control_p:.3f} |"
            )
        a = self.agreement
        if a:
            lines += [
                "",
                f"Attribution vs exact patching: Spearman {a.get('spearman_candidates', float('nan')):.2f} over the "
                f"{len(self.heads)} candidates (all positions), {a.get('spearman_readout', float('nan')):.2f} over all heads "
                f"at the readout slot (top-{int(a.get('k', 0))} overlap {a.get('topk_overlap_readout', float('nan')):.2f}).",
            ]
        lines += ["", "Stage timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items())]
        return "\n".join(lines) + "\n"


def find_heads(loaded: Any, task: Task, cfg: HeadFinderConfig | None = None, progress: bool = True) -> HeadFinderResult:
    """Find and validate the heads that carry in-context label information to the readout slot."""
    from mechicl.attribution_patching import agreement, attribution_patch

    cfg = cfg or HeadFinderConfig()
    model = bridge_of(loaded)
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    timings: dict[str, float] = {}
    say = (lambda s: print(f"[mechicl] {s}", flush=True)) if progress else (lambda s: None)

    # 1. screen: attribution patching of every head, plus exact readout-slot patching of every head
    #    (one-token re-runs: cheap), which catches heads attribution misjudges at the readout slot
    t = time.perf_counter()
    pair = pair_for(loaded, task, cfg.n_screen, cfg.n_examples, seed=cfg.seed)
    attr = attribution_patch(model, pair, ("head_out", "head_out_readout"), "denoise")
    a_all, a_read = attr["head_out"].values, attr["head_out_readout"].values
    patcher = Patcher(model, pair, max_rows=max(16, cfg.max_rows // 4), progress=progress)
    rd = patcher.sweep("head_out_readout", "denoise")
    rn = patcher.sweep("head_out_readout", "noise")
    n_cand = min(cfg.n_candidates, L * H)
    order = [(int(i) // H, int(i) % H) for i in a_all.reshape(-1).abs().argsort(descending=True)]
    by_readout = [(int(i) // H, int(i) % H) for i in rd.values.reshape(-1).abs().argsort(descending=True)]
    candidates = list(dict.fromkeys(by_readout[: max(1, n_cand // 3)] + order))[:n_cand]
    timings["screen"] = time.perf_counter() - t
    say(f"screened {L * H} heads (attribution + exact readout-slot patching) in {timings['screen']:.1f} s; "
        f"candidates {fmt_heads(candidates)}")

    # 2. confirm: exact patching of the candidates' outputs at all positions, both directions
    t = time.perf_counter()
    f0 = patcher.forwards
    den = patcher.sweep("head_out", "denoise", cells=candidates)
    noi = patcher.sweep("head_out", "noise", cells=candidates)
    timings["exact_patching"] = time.perf_counter() - t
    say(f"exact patching in {timings['exact_patching']:.1f} s ({patcher.forwards - f0:.1f} forward-equivalents)")
    ranked = sorted(candidates, key=lambda x: -float(den.values[x]))

    # 3. validate: ablation on held-out contexts, random control, function-vector effects
    t = time.perf_counter()
    ids = sample_contexts(task, cfg.n_eval, cfg.n_examples, seed=cfg.seed + 1)
    abl = HeadAblator(model, task, loaded.tokenizer, ids, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos,
                      seed=cfg.seed, max_rows=cfg.max_rows)
    bc, bf = abl.base["correct"], abl.base["flipped"]
    baseline = {
        "acc_correct": float(bc["correct"].mean()), "acc_flipped": float(bf["correct"].mean()),
        "p_correct": float(bc["p_true"].mean()), "p_flipped": float(bf["p_true"].mean()),
        "acc_zero_shot": float(abl.base["zero_shot"]["correct"].mean()),
    }
    baseline["gap"] = baseline["acc_correct"] - baseline["acc_flipped"]
    single = {a: abl.gap_table([[h] for h in ranked], a, seed=cfg.seed) for a in ABLATIONS}
    # every head alone (flipped contexts only): the exact size-1 control, and each candidate's standing in it
    every = [(l, h) for l in range(L) for h in range(H)]
    each = abl.gap_table([[x] for x in every], cfg.ablation, n_boot=0, with_correct=False)
    each_gr = each["gap_reduction"].to_numpy()  # [L * H]
    sizes = sorted({s for s in cfg.set_sizes if 1 <= s <= len(ranked)})
    set_rows, controls = [], []
    for s in tqdm(sizes, desc="random control", unit="size", disable=not progress, leave=False):
        top = sorted(ranked[:s])
        if s == 1:  # the top head alone was ablated above; its control is every other head once
            row = single[cfg.ablation].iloc[0].to_dict()
            ctrl = each[each.heads != fmt_heads(top)].drop(columns=["gap_reduction_ci_low", "gap_reduction_ci_high"])
            ctrl = ctrl.reset_index(drop=True)
            ctrl.insert(0, "draw", np.arange(len(ctrl)))
        else:
            row = abl.gap_table([top], cfg.ablation, seed=cfg.seed).iloc[0].to_dict()
            ctrl = abl.random_control(s, cfg.n_control, seed=cfg.seed, exclude=top, ablation=cfg.ablation)
        controls.append(ctrl)
        row.update(summarize_control(row["gap_reduction"], ctrl["gap_reduction"].to_numpy()))
        row["heads"] = fmt_heads(ranked[:s])
        set_rows.append(row)
    timings["ablation"] = time.perf_counter() - t
    t = time.perf_counter()
    fv = abl.function_vector_effects(progress=progress)
    timings["function_vectors"] = time.perf_counter() - t
    say(f"ablation + control in {timings['ablation']:.1f} s, function-vector effects in {timings['function_vectors']:.1f} s "
        f"(readout re-runs: {abl.correct.mode})")

    # tables
    fv_idx = fv.set_index(["layer", "head"])
    rows = []
    for rank, (l, h) in enumerate(ranked, 1):
        sz, sm = single["zero"].iloc[ranked.index((l, h))], single["mean"].iloc[ranked.index((l, h))]
        ctl = summarize_control(float(single[cfg.ablation].iloc[ranked.index((l, h))].gap_reduction),
                                np.delete(each_gr, l * H + h))
        rows.append({
            "rank": rank, "layer": l, "head": h,
            "attribution": float(a_all[l, h]),
            "patch_denoise": float(den.values[l, h]),
            "patch_noise": float(noi.effect[l, h]),
            "readout_patch_denoise": float(rd.values[l, h]),
            "readout_patch_noise": float(rn.effect[l, h]),
            "gap_reduction_mean": float(sm.gap_reduction),
            "gap_reduction_ci_low": float(sm.gap_reduction_ci_low),
            "gap_reduction_ci_high": float(sm.gap_reduction_ci_high),
            "gap_reduction_zero": float(sz.gap_reduction),
            "gap_reduction_p_mean": float(sm.gap_reduction_p),
            "d_acc_correct_mean": float(sm.d_acc_correct),
            "d_acc_correct_zero": float(sz.d_acc_correct),
            "d_acc_zero_shot_mean": float(sm.d_acc_zero_shot),
            "d_acc_zero_shot_zero": float(sz.d_acc_zero_shot),
            "fv_cie": float(fv_idx.loc[(l, h), "fv_cie"]),
            "control_ci_high": ctl["control_ci_high"], "control_p": ctl["control_p"],
        })
    heads = pd.DataFrame(rows)
    heads["gap_reduction"] = heads[f"gap_reduction_{cfg.ablation}"]
    heads["d_acc_zero_shot"] = heads[f"d_acc_zero_shot_{cfg.ablation}"]
    heads["d_acc_correct"] = heads[f"d_acc_correct_{cfg.ablation}"]
    all_heads = pd.DataFrame({
        "layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
        "attribution": a_all.reshape(-1).numpy(), "attribution_readout": a_read.reshape(-1).numpy(),
        "readout_patch_denoise": rd.values.reshape(-1).numpy(), "readout_patch_noise": rn.effect.reshape(-1).numpy(),
        "gap_reduction": each_gr,
    }).merge(fv, on=["layer", "head"])
    all_heads["candidate"] = [(int(l), int(h)) in set(candidates) for l, h in zip(all_heads["layer"], all_heads["head"])]
    cand_est = torch.tensor([float(a_all[x]) for x in candidates])
    cand_ex = torch.tensor([float(den.values[x]) for x in candidates])
    agr = agreement(a_read, rd.values, k=min(10, L * H))
    agr_c = agreement(cand_est, cand_ex, k=min(5, len(candidates))) if len(candidates) > 2 else {}
    agreement_out = {
        "spearman_readout": agr["spearman"], "topk_overlap_readout": agr["topk_overlap"], "k": agr["k"],
        "spearman_candidates": agr_c.get("spearman", float("nan")),
    }
    return HeadFinderResult(
        config=cfg, model=getattr(loaded, "name", "model"), task=task.name, heads=heads, all_heads=all_heads,
        sets=pd.DataFrame(set_rows), control=pd.concat(controls, ignore_index=True) if controls else pd.DataFrame(),
        baseline=baseline, agreement=agreement_out, timings=timings, stepper_mode=abl.correct.mode,
    )


def write_heads(result: HeadFinderResult, out: Path) -> dict[str, Path]:
    """heads.csv, all_heads.csv, sets.csv, control.csv, heatmaps, summary.md and config.json into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in ("heads", "all_heads", "sets", "control"):
        files[name] = out / f"{name}.csv"
        getattr(result, name).to_csv(files[name], index=False)
    ah = result.all_heads
    L, H = int(ah["layer"].max()) + 1, int(ah["head"].max()) + 1
    title = f"{result.model} on {result.task}"
    for col, label in [
        ("attribution", "attribution patching, head outputs (all positions), denoise"),
        ("readout_patch_denoise", "exact patching, head output at the readout slot, denoise"),
        ("fv_cie", "function-vector causal indirect effect (ΔP(true), shuffled labels)"),
    ]:
        v = torch.tensor(ah[col].to_numpy(), dtype=torch.float32).reshape(L, H)
        files[f"{col}_png"] = plot_heatmap(v, ("layer", "head"), out / f"{col}.png", f"{title}\n{label}")
    files["markdown"] = out / "summary.md"
    files["markdown"].write_text(result.markdown())
    (out / "config.json").write_text(json.dumps(asdict(result.config), indent=2))
    files["config"] = out / "config.json"
    return files
