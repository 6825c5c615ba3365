"""Measured behaviour curves of an organism and its model card (markdown beside the checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

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


def _log_ratio(a: float, b: float) -> str:
    import math

    return "inf" if b == 0 else f"{math.log(a / b):.2f}"


def _readout_label_logits(model: Any, batch: Any, heads: Sequence[tuple[int, int]], mean_z: Any) -> Any:
    """Label logits ``[batch, example, n_labels]`` with each head's ``hook_z`` set to ``mean_z`` at every readout slot."""
    import torch

    rows = torch.arange(batch.n_contexts)[:, None]

    def make_hook(layer: int) -> Any:
        def hook(z: Any, hook: Any) -> Any:  # z: [batch, pos, head, d_head]
            z = z.clone()
            for h in [h for l, h in heads if l == layer]:
                z[rows, batch.readout_pos, h] = mean_z[layer, h]
            return z

        return hook

    hooks = [(f"blocks.{layer}.attn.hook_z", make_hook(layer)) for layer in sorted({l for l, _ in heads})]
    with torch.no_grad():
        logits = model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=hooks)
    return logits[rows, batch.readout_pos][..., batch.label_token_ids]


def head_ablation(loaded: Any, n_contexts: int = 64, seed: int = 1, k_min: int = 4,
                  sets: Sequence[Sequence[tuple[int, int]]] | None = None) -> tuple[pd.DataFrame, dict[str, float]]:
    """Mean-ablate head outputs (``hook_z``) at every readout slot: each set in ``sets`` (default: every single head).

    Per head: Halawi et al.'s gap reduction on readout slots with >= ``k_min`` demonstrations
    (accuracy against the TRUE label; 1 = flipped contexts behave like correct ones, i.e. the
    model stops following the flipped labels), and zero-shot (k = 0) default-label accuracy.
    The mean is over readout slots of the default-label contexts. Cost: 2 + 2 x n_heads forwards
    of ``n_contexts`` 17-example contexts (< 1 s for a 2-layer organism).
    """
    import torch

    from mechicl.organism.language import organism_task
    from mechicl.prompts import build_prompt_batch, sample_contexts

    model, task = loaded.model, organism_task()
    ids = sample_contexts(task, n_contexts, 17, seed=seed)
    kw = dict(n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos)
    default, flipped = (build_prompt_batch(task, loaded.tokenizer, ids, c, **kw) for c in ("default", "flipped"))
    rows = torch.arange(default.n_contexts)[:, None]
    with torch.no_grad():
        _, cache = model.run_with_cache(default.tokens, attention_mask=default.attention_mask,
                                        names_filter=lambda n: n.endswith("attn.hook_z"))
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    mean_z = torch.stack([cache[f"blocks.{l}.attn.hook_z"][rows, default.readout_pos].mean((0, 1)) for l in range(L)])

    def acc(batch: Any, heads: Sequence[tuple[int, int]]) -> Any:  # [batch, example], vs the TRUE label
        return (_readout_label_logits(model, batch, heads, mean_z).argmax(-1) == batch.true_labels).double()

    base_c, base_f = acc(default, ()), acc(flipped, ())
    acc_c, acc_f = float(base_c[:, k_min:].mean()), float(base_f[:, k_min:].mean())
    out = []
    for heads in sets if sets is not None else [[(l, h)] for l in range(L) for h in range(H)]:
        af = float(acc(flipped, heads)[:, k_min:].mean())
        out.append({
            "heads": " ".join(f"L{l}H{h}" for l, h in heads), "size": len(heads),
            "gap_reduction": 1 - (acc_c - af) / (acc_c - acc_f) if acc_c > acc_f else float("nan"),
            "acc_flipped_ablated": af,
            "zero_shot_acc": float(acc(default, heads)[:, 0].mean()),
        })
    base = {"acc_correct": acc_c, "acc_flipped": acc_f, "zero_shot_acc": float(base_c[:, 0].mean())}
    return pd.DataFrame(out), base
