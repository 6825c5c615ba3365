"""`mechicl organism train`: train an organism (both stages), save its checkpoint, measure it, write its card.

Training is deterministic: one CPU thread, a seeded torch generator for the initial weights and a
seeded numpy generator for the data, so the same ``OrganismConfig`` gives bit-identical weights.

Two stages. (1) ``steps`` steps with every head. Context reading then ends up spread over the last
layer's heads, so no single head's ablation removes it. (2) If ``keep_heads > 0``: the last layer
keeps only the ``keep_heads`` heads whose readout-slot mean ablation closes most of the
flipped-label gap (``analysis.heads.ablation``, on contexts the evaluation does not use). The other
heads' output weights (``W_O`` columns) are set to zero and held there while training continues
for ``prune_steps`` steps, so the kept head takes over all label reading. This gives the organism
a known ground truth: one label-reading head. Architecture and checkpoint I/O: ``models.organism``.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm.auto import tqdm

from mechicl.analysis.behavior.curves import BehaviorConfig
from mechicl.analysis.heads.ablation import HeadAblation, gap_reduction
from mechicl.data.names import head_name
from mechicl.data.optimal_reader import bayes_curve
from mechicl.data.organism import MAP_KINDS, LanguageConfig, organism_task, organism_tokenizer, sample_sequences
from mechicl.data.prompts import build_prompt_batch, sample_contexts
from mechicl.errors import ConfigError
from mechicl.models.base import LoadedModel
from mechicl.models.device import input_device
from mechicl.models.organism import (
    OrganismConfig,
    build_model,
    load_checkpoint,
    out_weight,
    save_checkpoint,
    weights_sha256,
)
from mechicl.runs.behavior import run_behavior
from mechicl.runs.markdown import md_table
from mechicl.viz.organism import organism_vs_bayes


@dataclass(frozen=True)
class TrainResult:
    """A trained bridge, its loss curve (mean label loss per logged step), the wall time, and the
    pruning stage's choice: the last-layer heads' gap reductions before it and the heads kept."""

    model: Any  # TransformerBridge
    config: OrganismConfig
    loss_curve: tuple[tuple[int, float], ...]
    seconds: float
    gap_before_pruning: tuple[float, ...] = ()  # last layer, per head
    kept_heads: tuple[int, ...] = ()


def label_loss(model: Any, tokens: torch.Tensor, label_pos: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every label token, predicted from the position before it (inputs moved to the
    model's device)."""
    dev = input_device(model)
    tokens, label_pos = tokens.to(dev), label_pos.to(dev)
    logits = model(tokens)  # [b, pos, vocab]
    rows = torch.arange(tokens.shape[0], device=dev)[:, None]
    pred = logits[rows, label_pos - 1]  # [b, example, vocab]
    return F.cross_entropy(pred.flatten(0, 1), tokens[rows, label_pos].flatten())


@torch.no_grad()
def probe(model: Any, cfg: OrganismConfig, n: int = 256, ks: tuple[int, ...] = (0, 1, 4, 16)) -> dict[str, list[float]]:
    """Accuracy (argmax over the whole vocabulary) against the sequence's true map, per map kind, at example ``ks``.

    Uses a fixed held-out draw (seed ``cfg.seed + 1``). Cost: one forward of ``n`` sequences.
    """
    seq = sample_sequences(cfg.language, n, np.random.default_rng(cfg.seed + 1))
    logits = model(seq.tokens.to(input_device(model)))  # tokens on the model's device (CPU data, any device model)
    rows = torch.arange(n)[:, None]
    pred = logits.cpu()[rows, seq.label_pos - 1].argmax(-1)  # [n, example]
    target = seq.label_words.gather(1, seq.true_class)  # [n, example]: noise-free labels
    ok = (pred == target).double()
    return {
        kind: [float(ok[seq.map_kind == i, k].mean()) for k in ks if k < ok.shape[1]]
        for i, kind in enumerate(MAP_KINDS)
        if bool((seq.map_kind == i).any())
    }


def _fit(
    model: Any,
    cfg: OrganismConfig,
    rng: np.random.Generator,
    steps: int,
    lr: float,
    warmup: int,
    curve: list[tuple[int, float]],
    after_step: Any = None,
    progress: bool = True,
    log_every: int = 50,
    desc: str = "train organism",
) -> None:
    """``steps`` AdamW steps (linear warm-up, cosine decay, clipping 1.0) on fresh sequences from ``rng``."""
    if steps <= 0:
        return
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}], lr=lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    offset, running = (curve[-1][0] if curve else 0), []
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        seq = sample_sequences(cfg.language, cfg.batch, rng)
        loss = label_loss(model, seq.tokens, seq.label_pos)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append((offset + step + 1, float(np.mean(running))))
            bar.set_postfix(loss=f"{curve[-1][1]:.3f}")
            running = []


@torch.no_grad()
def last_layer_gap_reductions(model: Any, cfg: OrganismConfig, n_contexts: int = 64) -> np.ndarray:
    """Gap reduction of ablating each last-layer head at the query readout slot (k = 16) with its mean output
    over correct-label contexts (``HeadAblation`` mode ``mean_correct``), per head.

    Contexts are drawn with seed ``10_000 + cfg.seed``, apart from those the tests and cards use.
    Cost: two forwards of ``n_contexts`` contexts and ``2 x n_heads`` ablated one-token re-runs.
    """
    task = organism_task()
    ids = sample_contexts(task, n_contexts, 17, seed=10_000 + cfg.seed)
    was_training = model.training
    model.eval()
    kw = dict(n_ctx=cfg.n_ctx, prepend_bos=True, seed=cfg.seed)
    correct, flipped = (build_prompt_batch(task, organism_tokenizer(), ids, c, **kw) for c in ("default", "flipped"))
    abl = HeadAblation(model, correct, flipped, k_min=16, mode="mean_correct")
    last = cfg.n_layers - 1
    sc = abl.scores([[(last, h)] for h in range(cfg.n_heads)])
    model.train(was_training)
    return gap_reduction(abl.acc_last["correct"].mean(), abl.acc_last["flipped"].mean(), sc.acc_flipped_last.mean(-1))


def train(cfg: OrganismConfig, progress: bool = True, log_every: int = 50) -> TrainResult:
    """Train one organism (both stages, see the module docstring). Deterministic (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        model = build_model(cfg).train()
        rng = np.random.default_rng(cfg.seed)
        curve: list[tuple[int, float]] = []
        _fit(model, cfg, rng, cfg.steps, cfg.lr, cfg.warmup, curve, progress=progress, log_every=log_every)
        gaps, kept = (), ()
        if cfg.keep_heads:
            gr = last_layer_gap_reductions(model, cfg)
            if np.isnan(gr).all():
                warnings.warn(
                    "pruning: no last-layer head has a gap reduction (the model shows no flipped-label gap "
                    "after stage 1), so the kept head(s) are the lowest-index ones, not chosen by effect; "
                    "train longer or with another --seed, or use --keep-heads 0",
                    stacklevel=2,
                )
            order = np.argsort(-np.nan_to_num(gr, nan=-np.inf), kind="stable")
            kept = tuple(sorted(int(h) for h in order[: cfg.keep_heads]))
            d_head = cfg.d_model // cfg.n_heads
            w = out_weight(model, cfg.n_layers - 1)
            mask = torch.zeros(cfg.n_heads).index_fill_(0, torch.tensor(kept), 1.0).repeat_interleave(d_head)[None, :]

            def hold() -> None:  # pruned heads write nothing, ever
                with torch.no_grad():
                    w.mul_(mask)

            hold()
            _fit(
                model,
                cfg,
                rng,
                cfg.prune_steps,
                cfg.prune_lr,
                min(cfg.warmup, max(1, cfg.prune_steps // 20)),
                curve,
                after_step=hold,
                progress=progress,
                log_every=log_every,
                desc=f"prune to head(s) {kept}",
            )
            gaps = tuple(float(x) for x in gr)
        model.eval()
        return TrainResult(model, cfg, tuple(curve), time.perf_counter() - t0, gaps, kept)
    finally:
        torch.set_num_threads(threads)


def train_and_save(cfg: OrganismConfig, path: Path, name: str | None = None, progress: bool = True) -> Path:
    """Train, save the checkpoint, measure its curves and write the model card. Returns the card's path."""
    result = train(cfg, progress=progress)
    sha = weights_sha256(result.model)
    path = save_checkpoint(result.model, cfg, path, {"weights_sha256": sha, "train_seconds": f"{result.seconds:.1f}"})
    name = name or Path(path).stem
    loaded = LoadedModel(name, result.model, organism_tokenizer(), True, f"mechicl organism {Path(path).name}")
    acc = measure_curves(loaded)
    card = write_card(path, name, result, sha, acc, probe(result.model, cfg))
    card.write_text(card.read_text() + bayes_section(cfg.language, acc, card))
    return card


# ------------------------------------------------------------------- card ---

CURVE_CONDITIONS = ("default", "flipped", "arbitrary:a/b")
CURVE_KS = (0, 1, 2, 4, 8, 16)


def measure_curves(loaded: Any, n_contexts: int = 128, seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Accuracy against the *shown* labels per condition and k, with 95% t-intervals over contexts.

    Runs the behaviour readout unchanged on the ``organism`` task. Cost: 3 x ``n_contexts`` forwards of
    17-example contexts (~0.1 s each batch of 8 on one CPU thread).
    """
    cfg = BehaviorConfig(loaded.name, "organism", CURVE_CONDITIONS, max(CURVE_KS), n_contexts, seed, 32)
    res = run_behavior(loaded, organism_task(seed=seed), cfg, progress=progress)
    s = res.summary
    return s[(s.metric == "accuracy") & s.k.isin(CURVE_KS)].reset_index(drop=True)


def curves_markdown(acc: pd.DataFrame) -> str:
    """One row per condition, one column per k: ``mean [ci_low, ci_high]``."""
    ks = sorted(acc.k.unique())
    rows = []
    for cond in CURVE_CONDITIONS:
        r = acc[acc.condition == cond].set_index("k")
        rows.append(
            {
                "condition": cond,
                **{f"k={k}": f"{r.at[k, 'mean']:.3f} [{r.at[k, 'ci_low']:.2f}, {r.at[k, 'ci_high']:.2f}]" for k in ks},
            }
        )
    return md_table(pd.DataFrame(rows))


def write_card(
    path: Path, name: str, result: Any, sha256: str, acc: pd.DataFrame, probe: dict[str, list[float]]
) -> Path:
    """Write ``<checkpoint>.md``: recipe, training time, weights hash, loss curve and measured curves."""
    cfg = result.config
    lang = cfg.language
    p = lang.map_probs
    n = acc.n.iloc[0]
    loss = ", ".join(f"{s}: {v:.3f}" for s, v in result.loss_curve[:: max(1, len(result.loss_curve) // 8)])
    text = f"""# {name}

A mechicl model organism: a {cfg.n_layers}-layer, {cfg.n_heads}-head, d_model={cfg.d_model}, d_mlp={cfg.d_mlp}
`boot_native` TransformerBridge ({cfg.positional} positions, n_ctx={cfg.n_ctx}) trained by `mechicl.runs.organism`
on the synthetic language of `mechicl.data.organism`. Load it with `mechicl.models.load_model("{name}")`;
its task is `organism`.

## Recipe
- label maps per sequence: default {p[0]:.3f}, flipped {p[1]:.3f}, arbitrary {p[2]:.3f}
  (prior log-odds default:flipped = {_log_ratio(p[0], p[1])}); label noise {lang.label_noise}
  (each example's evidence: log-odds {_log_ratio(1 - lang.label_noise, lang.label_noise)})
- {lang.n_examples} examples per sequence, loss on every label; {cfg.steps} AdamW steps of {cfg.batch} sequences,
  lr {cfg.lr} (warm-up {cfg.warmup}, cosine decay), weight decay {cfg.weight_decay}, seed {cfg.seed}, one CPU thread
- {_pruning(result)}
- config JSON (also in the safetensors metadata): `{cfg.to_json()}`

## Training
- wall time: {result.seconds:.0f} s on one CPU thread
- weights sha256: `{sha256}`
- mean label loss (step: loss): {loss}
- held-out accuracy over the whole vocabulary against the sequence's true map, k = 0, 1, 4, 16:
  {", ".join(f"{kind} {[round(v, 3) for v in vals]}" for kind, vals in probe.items())}

## Measured behaviour (task `organism`, {n} contexts, accuracy against the shown labels, 95% CI)
{curves_markdown(acc)}
"""
    out = Path(path).with_suffix(".md")
    out.write_text(text)
    return out


def _pruning(result: Any) -> str:
    cfg = result.config
    if not cfg.keep_heads:
        return "no pruning stage"
    last = cfg.n_layers - 1
    gaps = ", ".join(f"{head_name(last, h)} {g:.2f}" for h, g in enumerate(result.gap_before_pruning))
    kept = " ".join(head_name(last, h) for h in result.kept_heads)
    return (
        f"pruning stage: after step {cfg.steps} the last layer's heads closed the flipped-label gap at k=16 by "
        f"{gaps} when mean-ablated alone at the readout slot; kept {kept}, zeroed the other heads' W_O and "
        f"trained {cfg.prune_steps} more steps (lr {cfg.prune_lr}) with them held at zero"
    )


def _log_ratio(a: float, b: float) -> str:
    return "inf" if b == 0 else f"{math.log(a / b):.2f}"


# --------------------------------------------------------- Bayes reference ---

BAYES_HEADER = "## Bayes-optimal reference"


def bayes_table(lang: LanguageConfig, acc: pd.DataFrame) -> pd.DataFrame:
    """Per (condition, k): the organism's accuracy (with CI), the Bayes-optimal reader's accuracy and
    P(shown label), and the gap organism - Bayes (``data.optimal_reader``; exact, no sampling)."""
    bayes = bayes_curve(lang, CURVE_CONDITIONS, tuple(int(k) for k in sorted(acc.k.unique())))
    t = acc[["condition", "k", "mean", "ci_low", "ci_high"]].merge(bayes, on=["condition", "k"])
    return t.rename(columns={"mean": "organism", "accuracy": "bayes_accuracy", "p_target": "bayes_p"}).assign(
        gap=lambda d: d["organism"] - d["bayes_accuracy"]
    )


def bayes_section(lang: LanguageConfig, acc: pd.DataFrame, card: Path) -> str:
    """The card's Bayes section (markdown) and its plot ``<card stem>.bayes.png`` beside the card."""
    t = bayes_table(lang, acc)
    plot = Path(card).with_suffix(".bayes.png")
    organism_vs_bayes(t, plot, Path(card).stem)
    rows = t[["condition", "k", "organism", "ci_low", "ci_high", "bayes_accuracy", "bayes_p", "gap"]]
    return f"""
{BAYES_HEADER}
The ideal reader of this language (`mechicl.data.optimal_reader`: exact posterior over the four label maps
with the prior and label noise above) on the same conditions. `bayes_accuracy` is its decision
between the condition's two label words (0.5 on a tie), `bayes_p` its probability of the shown
label among those two, `gap` = organism accuracy - Bayes accuracy. The organism columns are
`measure_curves` (128 contexts, seed 0) run when this section was written. Plot: `{plot.name}`.

{md_table(rows)}
"""


def refresh_bayes_section(checkpoint: Path, n_contexts: int = 128) -> Path:
    """Re-measure a checkpoint's curves (as ``measure_curves``) and replace or append its card's Bayes section.

    Cost: 3 x ``n_contexts`` organism forwards (seconds). Returns the card's path.
    """
    loaded = load_checkpoint(Path(checkpoint))
    with safe_open(str(checkpoint), "pt") as f:
        cfg = OrganismConfig.from_json(f.metadata()["mechicl_organism"])
    card = Path(checkpoint).with_suffix(".md")
    text = card.read_text()
    if BAYES_HEADER in text:
        head, rest = text.split(BAYES_HEADER, 1)
        nxt = rest.find("\n## ")
        text = head.rstrip("\n") + "\n" + (rest[nxt:] if nxt >= 0 else "")
    card.write_text(text.rstrip("\n") + "\n" + bayes_section(cfg.language, measure_curves(loaded, n_contexts), card))
    return card


def train_command(args: argparse.Namespace) -> int:
    """`mechicl organism train`: train an organism and write its checkpoint and model card."""
    try:
        lang = LanguageConfig.from_prior_strength(args.prior_strength, args.p_arbitrary, args.label_noise)
        cfg = OrganismConfig(
            language=lang, seed=args.seed, steps=args.steps, keep_heads=args.keep_heads, prune_steps=args.prune_steps
        )
    except ValueError as e:
        raise ConfigError(f"bad organism recipe: {e}") from e
    out = args.out or Path("runs") / f"organism-s{args.prior_strength:g}-seed{args.seed}.safetensors"
    card = train_and_save(cfg, out, name=out.stem)
    print(card.read_text())
    print(f"[mechicl] wrote {out} and {card}")
    return 0
