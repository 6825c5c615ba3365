"""Measured behaviour curves of an organism and its model card (markdown beside the checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

CURVE_CONDITIONS = ("default", "flipped", "arbitrary:a/b")
CURVE_KS = (0, 1, 2, 4, 8, 16)


def measure_curves(loaded: Any, n_contexts: int = 128, seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Accuracy against the *shown* labels per condition and k, with 95% t-intervals over contexts.

    Runs ``mechicl.behavior`` unchanged on the ``organism`` task. Cost: 3 x ``n_contexts`` forwards of
    17-example contexts (~0.1 s each batch of 8 on one CPU thread).
    """
    from mechicl.behavior import BehaviorConfig, run_behavior
    from mechicl.organism.language import organism_task

    cfg = BehaviorConfig(loaded.name, "organism", CURVE_CONDITIONS, max(CURVE_KS), n_contexts, seed, 32)
    res = run_behavior(loaded, organism_task(seed=seed), cfg, progress=progress)
    s = res.summary
    return s[(s.metric == "accuracy") & s.k.isin(CURVE_KS)].reset_index(drop=True)


def curves_markdown(acc: pd.DataFrame) -> str:
    """One row per condition, one column per k: ``mean [ci_low, ci_high]``."""
    ks = sorted(acc.k.unique())
    lines = ["| condition | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for cond in CURVE_CONDITIONS:
        rows = acc[acc.condition == cond].set_index("k")
        cells = [f"{rows.at[k, 'mean']:.3f} [{rows.at[k, 'ci_low']:.2f}, {rows.at[k, 'ci_high']:.2f}]" for k in ks]
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_card(path: Path, name: str, result: Any, sha256: str, acc: pd.DataFrame, probe: dict[str, list[float]]) -> Path:
    """Write ``<checkpoint>.md``: recipe, training time, weights hash, loss curve and measured curves."""
    cfg = result.config
    lang = cfg.language
    p = lang.map_probs
    n = acc.n.iloc[0]
    loss = ", ".join(f"{s}: {v:.3f}" for s, v in result.loss_curve[:: max(1, len(result.loss_curve) // 8)])
    text = f"""# {name}

A mechicl model organism: a {cfg.n_layers}-layer, {cfg.n_heads}-head, d_model={cfg.d_model}, d_mlp={cfg.d_mlp}
`boot_native` TransformerBridge ({cfg.positional} positions, n_ctx={cfg.n_ctx}) trained by `mechicl.organism.train`
on the synthetic language of `mechicl.organism.language`. Load it with `mechicl.models.load_model("{name}")`;
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
    gaps = ", ".join(f"L{last}H{h} {g:.2f}" for h, g in enumerate(result.gap_before_pruning))
    kept = " ".join(f"L{last}H{h}" for h in result.kept_heads)
    return (f"pruning stage: after step {cfg.steps} the last layer's heads closed the flipped-label gap at k=16 by "
            f"{gaps} when mean-ablated alone at the readout slot; kept {kept}, zeroed the other heads' W_O and "
            f"trained {cfg.prune_steps} more steps (lr {cfg.prune_lr}) with them held at zero")


def _log_ratio(a: float, b: float) -> str:
    import math

    return "inf" if b == 0 else f"{math.log(a / b):.2f}"
