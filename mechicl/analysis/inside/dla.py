"""Direct logit attribution (DLA) at readout slots, and the prior-vs-context decomposition.

* **DLA**: per head (z @ W_O, through Gemma's post-attention norm when present) and per MLP, the
  direct contribution to each label logit, with the final norm's scale frozen from the run (as
  TransformerLens's ``ActivationCache.apply_ln_to_stack`` does) and its gain/bias applied; the
  components sum to the model's label logits (tested to 1e-4).
* **Prior vs context**: the same queries under default and flipped contexts; per component, the
  part of its direct effect that follows the label shown in context and the part that follows the
  model's zero-shot (k = 0) prediction.

The *margin* of a label is its logit minus the mean logit of the other labels (not the
answer - foil logit difference of patching).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechicl.analysis.engine.readout import ReadoutRun, label_logits, readout_activations
from mechicl.data.names import head_name
from mechicl.data.prompts import PromptBatch
from mechicl.models.device import model_dtype


def norm_affine(norm: Any) -> tuple[Tensor, Tensor | None, bool]:
    """(gain, bias, centers) of a LayerNorm/RMSNorm bridge: out = (center(x) / scale) * gain + bias."""
    centers = not bool(getattr(norm, "uses_rms_norm", False))
    w = norm.weight.detach().cpu().double()
    gain = 1.0 + w if getattr(norm, "uses_weight_offset", False) else w
    comp = getattr(norm, "original_component", None)
    bias = getattr(comp, "bias", None)
    return gain, (bias.detach().cpu().double() if centers and bias is not None else None), centers


def frozen_norm(x: Tensor, scale: Tensor, gain: Tensor, centers: bool) -> Tensor:
    """A norm with its scale frozen from the run: linear in x, so it distributes over components."""
    if centers:
        x = x - x.mean(-1, keepdim=True)
    return x / scale * gain


@dataclass(frozen=True)
class DirectLogits:
    """Direct contribution of every component to every label logit at every readout slot.

    ``contrib[c, b, e, y]`` sums over c to ``logits[b, e, y]``, the model's label logits before any
    soft-capping. Components: ``embed`` (and ``pos_embed``), ``L{l}H{h}`` heads, ``L{l}.b_O`` (attention
    bias, when the model has one), ``L{l}.mlp``, and ``bias`` (final-norm bias + unembedding bias).
    Cost: one forward per context; memory: components x batch x example x n_labels floats.
    """

    contrib: Float[Tensor, "component batch example n_labels"] = field(repr=False)
    logits: Float[Tensor, "batch example n_labels"] = field(repr=False)
    names: tuple[str, ...]
    layer: tuple[int, ...]  # -1 for embed/bias
    head: tuple[int, ...]  # -1 for non-head components
    condition: str

    def margin(self, target: Int[Tensor, "batch example"]) -> Float[Tensor, "component batch example"]:
        """Per component: logit of ``target`` minus the mean logit of the other labels."""
        return margin(self.contrib, target)


def margin(
    x: Float[Tensor, "... batch example n_labels"], target: Int[Tensor, "batch example"]
) -> Float[Tensor, "... batch example"]:
    """Logit of ``target`` minus the mean logit of the other labels."""
    n_labels = x.shape[-1]
    idx = target.expand(*x.shape[:-1])[..., None]
    tgt = x.gather(-1, idx)[..., 0]
    return tgt - (x.sum(-1) - tgt) / (n_labels - 1)


def _has_hook(model: Any, name: str) -> bool:
    return name in model.hook_dict


def _attention_components(
    model: Any, st: dict[str, Tensor], l: int, post_attn: bool, tol: float = 1e-4
) -> tuple[Float[Tensor, "component batch example d_model"], list[str]]:
    """Layer ``l``'s attention output split into its heads (and ``b_O``), checked against ``hook_attn_out``."""
    attn = model.blocks[l].attn
    z = st[f"blocks.{l}.attn.hook_z"]  # [b, ex, H, d_head]
    heads = torch.einsum("behd,hdm->hbem", z, attn.W_O.detach().cpu().double())  # [H, b, ex, d_model]
    b_O = getattr(attn, "b_O", None)
    parts = [heads] + ([b_O.detach().cpu().double().expand_as(heads[0])[None]] if b_O is not None else [])
    out = torch.cat(parts)
    if post_attn:  # Gemma: attn_out = RMSNorm(sum of heads + b_O); scale frozen from the run
        g, _, c = norm_affine(model.blocks[l].ln1_post)
        out = frozen_norm(out, st[f"blocks.{l}.ln1_post.hook_scale"], g, c)
    ref = st[f"blocks.{l}.hook_attn_out"]
    err = (out.sum(0) - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
    if err > tol:
        raise RuntimeError(f"layer {l}: per-head results do not sum to hook_attn_out (rel. error {err:.2e})")
    names = [head_name(l, h) for h in range(z.shape[2])] + ([f"L{l}.b_O"] if b_O is not None else [])
    return out, names


def _post_attn(model: Any) -> bool:
    """Whether the blocks have a post-attention norm (Gemma); raises if only some do."""
    n_layers = model.cfg.n_layers
    post_attn = [f"blocks.{l}.ln1_post" for l in range(n_layers) if _has_hook(model, f"blocks.{l}.ln1_post.hook_scale")]
    if post_attn and len(post_attn) != n_layers:
        raise RuntimeError("some but not all blocks have a post-attention norm; DLA does not handle this model")
    return bool(post_attn)


def dla_names(model: Any) -> list[str]:
    """The hooks ``direct_logits`` reads at the readout slots (up to ``ln_final.hook_out``)."""
    post_attn = _post_attn(model)
    want = ["hook_embed", "hook_pos_embed", "ln_final.hook_in", "ln_final.hook_scale", "ln_final.hook_out"]
    for l in range(model.cfg.n_layers):
        want += [f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_attn_out", f"blocks.{l}.hook_mlp_out"]
        if post_attn:
            want.append(f"blocks.{l}.ln1_post.hook_scale")
    return [n for n in want if _has_hook(model, n)]


def direct_logits(
    model: Any, batch: PromptBatch, batch_size: int = 8, progress: bool = True, run: ReadoutRun | None = None
) -> DirectLogits:
    """Decompose the label logits at every readout slot into per-head / per-MLP direct effects.

    Cost: one forward per context (none with ``run``, a ``ReadoutRun`` of ``batch`` that kept ``dla_names``
    and ran up to ``ln_final.hook_out``); the decomposition runs in float64 on readout-slot activations."""
    n_layers = model.cfg.n_layers
    post_attn = _post_attn(model)
    g_f, b_f, c_f = norm_affine(model.ln_final)
    # the sums are checked to 1e-4 in float32; a half-precision model's own activations carry its rounding
    # (measured 2.3e-3 / 2.9e-3 relative on organism-strong / SmolLM2 in bfloat16): 2 eps of its dtype
    tol = max(1e-4, 2 * torch.finfo(model_dtype(model)).eps)
    W_U = model.W_U.detach()  # DLA runs on the CPU in float64 on readout-slot activations (small)
    ids = batch.label_token_ids.to(W_U.device)
    W_U = W_U[:, ids].cpu().double()  # [d_model, n_labels]
    b_U = getattr(model, "b_U", None)
    b_U = b_U.detach()[ids].cpu().double() if b_U is not None else None
    names: list[str] = []
    chunks_out, logits_out = [], []
    want = dla_names(model)
    for _sub, acts in readout_activations(
        model, batch, want, batch_size, progress, desc="dla", stop="ln_final.hook_out", run=run
    ):
        st = {n: x.cpu().double() for n, x in acts.items()}
        comps, nm = [], []
        for name in ("hook_embed", "hook_pos_embed"):
            if name in st:
                comps.append(st[name])
                nm.append(name[5:])
        for l in range(n_layers):
            out, layer_names = _attention_components(model, st, l, bool(post_attn), tol)
            comps += list(out) + [st[f"blocks.{l}.hook_mlp_out"]]
            nm += layer_names + [f"L{l}.mlp"]
        stack = torch.stack(comps)  # [C, b, ex, d_model]
        resid = st["ln_final.hook_in"]
        err = (stack.sum(0) - resid).abs().max() / resid.abs().max()
        if err > tol:
            raise RuntimeError(f"components do not sum to the final residual (rel. error {err:.2e})")
        normed = frozen_norm(stack, st["ln_final.hook_scale"], g_f, c_f)  # like apply_ln_to_stack, plus the gain
        contrib = normed @ W_U  # [C, b, ex, n_labels]
        bias = torch.zeros_like(contrib[0])
        if b_f is not None:
            bias = bias + b_f @ W_U
        if b_U is not None:
            bias = bias + b_U
        contrib = torch.cat([contrib, bias[None]])
        nm.append("bias")
        logits = st["ln_final.hook_out"] @ W_U + (b_U if b_U is not None else 0.0)
        chunks_out.append(contrib)
        logits_out.append(logits)
        names = nm
    layer = tuple(int(n[1:].split("H")[0].split(".")[0]) if n.startswith("L") else -1 for n in names)
    head = tuple(int(n.split("H")[1]) if n.startswith("L") and "H" in n else -1 for n in names)
    return DirectLogits(torch.cat(chunks_out, 1), torch.cat(logits_out), tuple(names), layer, head, batch.condition)


def zero_shot_prior(
    model: Any, zero_shot: PromptBatch, shape: tuple[int, int], batch_size: int = 64, progress: bool = True
) -> Int[Tensor, "batch example"]:
    """The label the model predicts for each input with no demonstrations (its pre-trained prior)."""
    logits = label_logits(model, zero_shot, batch_size, progress)  # [b * ex, 1, n_labels]
    return logits[:, 0].argmax(-1).reshape(shape)


def _component_frame(dl: DirectLogits) -> pd.DataFrame:
    kind = ["head" if h >= 0 else ("mlp" if n.endswith(".mlp") else "other") for n, h in zip(dl.names, dl.head)]
    return pd.DataFrame({"component": dl.names, "layer": dl.layer, "head": dl.head, "kind": kind})


def dla_table(
    dl: DirectLogits, batch: PromptBatch, prior: Int[Tensor, "batch example"], k_min: int = 1
) -> pd.DataFrame:
    """Mean direct effect of each component on (shown label - other) and (prior label - other), k >= k_min.

    Adds a ``total`` row (the model's logit difference) per decomposition.
    """
    frames = []
    for decomp, target in [("shown", batch.shown_labels), ("prior", prior)]:
        d = dl.margin(target)[:, :, k_min:].mean((1, 2)).numpy()
        tot = margin(dl.logits, target)[:, k_min:].mean().item()
        f = _component_frame(dl).assign(condition=dl.condition, decomposition=decomp, dla=d)
        frames += [
            f,
            pd.DataFrame(
                [
                    {
                        "component": "total",
                        "layer": -1,
                        "head": -1,
                        "kind": "total",
                        "condition": dl.condition,
                        "decomposition": decomp,
                        "dla": tot,
                    }
                ]
            ),
        ]
    return pd.concat(frames, ignore_index=True)


def balanced_mean(
    x: Float[Tensor, "component batch example"], cls: Int[Tensor, "batch example"]
) -> Float[Tensor, "component"]:
    """Mean over the classes present in ``cls`` of the per-class mean over queries.

    A component that pushes one label by the same amount everywhere averages to 0 this way, whatever
    the class balance of the queries."""
    means = [x[:, cls == c].mean(-1) for c in torch.unique(cls)]
    return torch.stack(means).mean(0)


def prior_vs_context(
    dl_default: DirectLogits,
    dl_flipped: DirectLogits,
    default: PromptBatch,
    flipped: PromptBatch,
    prior: Int[Tensor, "batch example"],
    k_min: int = 1,
) -> pd.DataFrame:
    """Per component, how much of its direct effect follows the shown label vs the zero-shot prior.

    With D_c(y) the component's direct effect on (logit y - mean other logits) in context c, y_d / y_f
    the labels shown for the query's class in default / flipped contexts and p its zero-shot label:
      context = 1/4 [D_d(y_d) - D_d(y_f) - D_f(y_d) + D_f(y_f)]  (the part that moves with the shown label)
      prior   = 1/2 [D_d(p) + D_f(p)]                             (the part that stays on the prior)
    context is averaged class-balanced over the query's true class, prior over its prior label
    (``balanced_mean``), so a constant push toward one label counts as neither; queries with k >= k_min.
    ``side = context - prior``. The ``dla_*`` columns are plain means (ordinary DLA).
    """
    if not torch.equal(default.example_ids, flipped.example_ids):
        raise ValueError("prior_vs_context needs default and flipped batches built from the same example ids")
    yd, yf = default.shown_labels, flipped.shown_labels
    Dd, Df = dl_default.contrib, dl_flipped.contrib
    q = slice(k_min, None)
    m = lambda x: x[:, :, q].mean((1, 2)).numpy()  # noqa: E731
    context = 0.25 * (margin(Dd, yd) - margin(Dd, yf) - margin(Df, yd) + margin(Df, yf))
    prior_part = 0.5 * (margin(Dd, prior) + margin(Df, prior))
    f = _component_frame(dl_default)
    f["context"] = balanced_mean(context[:, :, q], default.true_labels[:, q]).numpy()
    f["prior"] = balanced_mean(prior_part[:, :, q], prior[:, q]).numpy()
    f["side"] = f["context"] - f["prior"]
    f["dla_shown_default"], f["dla_shown_flipped"] = m(margin(Dd, yd)), m(margin(Df, yf))
    f["dla_prior_default"], f["dla_prior_flipped"] = m(margin(Dd, prior)), m(margin(Df, prior))
    return f
