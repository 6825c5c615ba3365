"""Attribution at readout slots: attention saliency, logit lens, direct logit attribution (DLA).

* **Saliency** (Wang et al., *Label Words are Anchors*): I_l = |sum_h A_{h,l} * dL/dA_{h,l}|, with
  gradients taken through ``blocks.{l}.attn.hook_pattern`` (a forward hook keeps the pattern
  tensors; no model code is patched). L is the cross-entropy of the *shown* label over the label
  set at the query slot(s). Per layer: S_wp (text -> label tokens), S_pq (label tokens -> query),
  S_ww (all other pairs), each a mean over its pairs (i <- j, j < i).
* **Logit lens**: the model's own final norm and unembedding (``readout.unembed_labels``) applied
  to the residual stream after each block, restricted to the label set.
* **DLA**: per head (z @ W_O, through Gemma's post-attention norm when present) and per MLP, the
  direct contribution to each label logit, with the final norm's scale frozen from the run (as
  TransformerLens's ``ActivationCache.apply_ln_to_stack`` does) and its gain/bias applied; the
  components sum to the model's label logits (tested to 1e-4).
* **Prior vs context**: the same queries under default and flipped contexts; per component, the
  part of its direct effect that follows the label shown in context and the part that follows the
  model's zero-shot (k = 0) prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.attention import _heads_frame
from mechicl.prompts import PromptBatch, build_prompt_batch
from mechicl.readout import at_slots, label_logits, readout_activations, run_until, unembed_labels
from mechicl.stats import t_interval
from mechicl.tasks import Task, Template


def _query_index(batch: PromptBatch, queries: str, k_min: int) -> Int[Tensor, "q"]:
    if queries == "last":
        return torch.tensor([batch.n_examples - 1])
    if queries == "all":
        return torch.arange(k_min, batch.n_examples)
    raise ValueError(f"queries must be 'last' or 'all', got {queries!r}")


# ------------------------------------------------------------- saliency ---


def saliency_maps(model: Any, batch: PromptBatch, queries: str = "last", k_min: int = 1
                  ) -> Float[Tensor, "batch layer head query key"]:
    """|A_h * dL/dA_h| for every head (one forward + backward over ``batch``; call on small sub-batches).

    Summing A * dL/dA over heads *before* the absolute value gives Wang et al.'s per-layer I_l.
    Returned as the signed product; take ``.abs()`` per head or after summing heads.
    """
    store: dict[int, Tensor] = {}

    def keep(layer: int) -> Callable:
        def fn(x: Tensor, hook: Any) -> Tensor:
            store[layer] = x
            return x

        return fn

    def make_leaf(x: Tensor, hook: Any) -> Tensor:  # the graph needs one input that requires grad
        return x if x.requires_grad else x.detach().requires_grad_(True)

    qi = _query_index(batch, queries, k_min)
    n_layers = model.cfg.n_layers
    hooks = [("hook_embed", make_leaf)] + [(f"blocks.{l}.attn.hook_pattern", keep(l)) for l in range(n_layers)]
    with torch.enable_grad():
        resid = run_until(model, batch.tokens, hooks, attention_mask=batch.attention_mask)
        at = at_slots(resid, batch.readout_pos[:, qi])  # [b, q, d_model]
        logits = unembed_labels(model, at, batch.label_token_ids)  # [b, q, n_labels]
        target = batch.shown_labels[:, qi]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        pats = [store[l] for l in range(n_layers)]
        grads = torch.autograd.grad(loss, pats)
    return torch.stack([(p * g).detach() for p, g in zip(pats, grads)], dim=1).float()


def saliency_pair_masks(batch: PromptBatch, queries: str = "last", k_min: int = 1
                        ) -> dict[str, Float[Tensor, "batch query_pos key_pos"]]:
    """Masks of Wang et al.'s pair sets over (i <- j): ``wp`` (label token <- earlier token),
    ``pq`` (query slot <- earlier label token), ``ww`` (every other j < i up to the last query)."""
    n, w = batch.tokens.shape
    qi = _query_index(batch, queries, k_min)
    rows = torch.arange(n)[:, None]
    pq = torch.zeros(n, w, w)
    wp = torch.zeros(n, w, w)
    last = int(qi.max())
    for i in qi.tolist():
        pq[rows, batch.readout_pos[:, i : i + 1], batch.label_pos[:, :i]] = 1.0
    lab = batch.label_pos[:, :last]  # label tokens that precede the last query
    lower = torch.tril(torch.ones(w, w), diagonal=-1)
    wp[rows, lab] = lower[lab]
    upto = (torch.arange(w)[None, :, None] <= batch.readout_pos[:, last, None, None]).float()
    ww = lower[None] * upto * (1 - pq) * (1 - wp)
    return {"wp": wp, "pq": pq, "ww": ww}


@dataclass(frozen=True)
class Saliency:
    """``layers``: condition, layer, S_wp, S_pq, S_ww (means over pairs, then over contexts) and their
    shares of S_wp + S_pq + S_ww. ``heads``: condition, layer, head, saliency (mean |A_h dL/dA_h| over
    the pq pairs: how much each head's attention onto label tokens matters for the loss).
    Cost: one forward + backward per context; memory: a sub-batch's patterns and their gradients."""

    layers: pd.DataFrame = field(repr=False)
    heads: pd.DataFrame = field(repr=False)


def attention_saliency(model: Any, batches: Sequence[PromptBatch], queries: str = "last", k_min: int = 1,
                       batch_size: int = 4, progress: bool = True) -> Saliency:
    layer_rows, head_rows = [], []
    for batch in batches:
        per_ctx_layer, per_ctx_head = [], []
        chunks = range(0, batch.n_contexts, batch_size)
        for start in tqdm(chunks, desc=f"saliency {batch.condition}", unit="batch", disable=not progress, leave=False):
            sub = batch.select(slice(start, start + batch_size))
            prod = saliency_maps(model, sub, queries, k_min)  # [b, L, H, W, W]
            masks = saliency_pair_masks(sub, queries, k_min)
            i_layer = prod.sum(2).abs()  # [b, L, W, W]
            s = {k: (i_layer * m[:, None]).sum((-1, -2)) / m.sum((-1, -2))[:, None] for k, m in masks.items()}
            per_ctx_layer.append(torch.stack([s["wp"], s["pq"], s["ww"]], -1))  # [b, L, 3]
            pq = masks["pq"][:, None, None]
            per_ctx_head.append((prod.abs() * pq).sum((-1, -2)) / pq.sum((-1, -2)))  # [b, L, H]
        lay = torch.cat(per_ctx_layer).mean(0).numpy()  # [L, 3]
        tot = lay.sum(-1, keepdims=True)
        layer_rows.append(pd.DataFrame({
            "condition": batch.condition, "layer": np.arange(lay.shape[0]),
            "S_wp": lay[:, 0], "S_pq": lay[:, 1], "S_ww": lay[:, 2],
            "share_wp": lay[:, 0] / tot[:, 0], "share_pq": lay[:, 1] / tot[:, 0], "share_ww": lay[:, 2] / tot[:, 0],
        }))
        hd = torch.cat(per_ctx_head).mean(0).numpy()
        head_rows.append(_heads_frame(hd, condition=batch.condition, saliency=hd.ravel()))
    return Saliency(pd.concat(layer_rows, ignore_index=True), pd.concat(head_rows, ignore_index=True))


# ----------------------------------------------------------- logit lens ---


def lens_logits(model: Any, batch: PromptBatch, batch_size: int = 8, progress: bool = True
                ) -> Float[Tensor, "batch example depth n_labels"]:
    """Label logits read from the residual stream after ``depth`` blocks (0 = embeddings, n_layers = final).

    Uses the model's final norm and unembedding; depth n_layers equals the model's own logits.
    Cost: one forward per context (no unembedding) plus (n_layers + 1) tiny label-set readouts.
    """
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
    out = []
    for sub, acts in readout_activations(model, batch, names, batch_size, progress, desc="lens"):
        resid = torch.stack([acts[n] for n in names], dim=2)  # [b, ex, depth, d_model]
        with torch.no_grad():
            out.append(unembed_labels(model, resid, sub.label_token_ids))
    return torch.cat(out)


@dataclass(frozen=True)
class Lens:
    """``raw``: condition, context, k, depth, metric, value. ``summary``: condition, depth, metric, mean,
    ci_low, ci_high, n (over contexts, each averaged over k >= k_min). ``gap``: depth, metric, mean, ci_low,
    ci_high of (default - flipped), paired over contexts. ``critical_depth``: first depth where the
    true-label accuracy under flipped contexts falls below default's (CI excludes 0 and gap >= min_gap);
    None when it never does. Depth d = residual after d blocks (0 = embeddings)."""

    raw: pd.DataFrame = field(repr=False)
    summary: pd.DataFrame = field(repr=False)
    gap: pd.DataFrame = field(repr=False)
    critical_depth: int | None
    min_gap: float


def lens_metrics(logits: Float[Tensor, "batch example depth n_labels"], batch: PromptBatch) -> pd.DataFrame:
    """accuracy / log_likelihood against shown and true labels over the label set, per (context, k, depth)."""
    logp = torch.log_softmax(logits.double(), -1)
    n, k, d, _ = logp.shape
    frames = []
    for name, target in [("shown", batch.shown_labels), ("true", batch.true_labels)]:
        t = target[:, :, None].expand(n, k, d)
        for metric, v in [(f"accuracy_{name}", (logp.argmax(-1) == t).double()),
                          (f"log_likelihood_{name}", logp.gather(-1, t[..., None])[..., 0])]:
            frames.append(pd.DataFrame({
                "condition": batch.condition,
                "context": np.repeat(np.arange(n), k * d), "k": np.tile(np.repeat(np.arange(k), d), n),
                "depth": np.tile(np.arange(d), n * k), "metric": metric, "value": v.reshape(-1).numpy(),
            }))
    return pd.concat(frames, ignore_index=True)


def logit_lens(model: Any, batches: Sequence[PromptBatch], k_min: int = 1, min_gap: float = 0.05,
               batch_size: int = 8, progress: bool = True) -> Lens:
    """Logit lens for each batch (give ``default`` and ``flipped`` built from the same example ids).

    Cost: one forward per context per batch.
    """
    raw = pd.concat([lens_metrics(lens_logits(model, b, batch_size, progress), b) for b in batches], ignore_index=True)
    per_ctx = raw[raw.k >= k_min].groupby(["condition", "depth", "metric", "context"], sort=False)["value"].mean()
    rows = []
    for (cond, depth, metric), s in per_ctx.groupby(level=[0, 1, 2], sort=False):
        m, lo, hi = t_interval(s.to_numpy())
        rows.append((cond, depth, metric, m, lo, hi, len(s)))
    summary = pd.DataFrame(rows, columns=["condition", "depth", "metric", "mean", "ci_low", "ci_high", "n"])
    conds = set(raw.condition)
    gap_rows, critical = [], None
    if {"default", "flipped"} <= conds:
        pc = per_ctx.unstack("condition")
        for (depth, metric), s in pc.groupby(level=[0, 1], sort=False):
            m, lo, hi = t_interval((s["default"] - s["flipped"]).to_numpy())
            gap_rows.append((depth, metric, m, lo, hi))
    gap = pd.DataFrame(gap_rows, columns=["depth", "metric", "mean", "ci_low", "ci_high"])
    if len(gap):
        critical = critical_depth(gap, min_gap)
    return Lens(raw, summary, gap, critical, min_gap)


def critical_depth(gap: pd.DataFrame, min_gap: float = 0.05) -> int | None:
    """First depth whose true-label accuracy gap (default - flipped) is >= ``min_gap`` with its CI above 0."""
    acc = gap[gap.metric == "accuracy_true"].sort_values("depth")
    hits = acc[(acc.ci_low > 0) & (acc["mean"] >= min_gap)]
    return int(hits.depth.iloc[0]) if len(hits) else None


# ------------------------------------------------- direct logit attribution ---


def norm_affine(norm: Any) -> tuple[Tensor, Tensor | None, bool]:
    """(gain, bias, centers) of a LayerNorm/RMSNorm bridge: out = (center(x) / scale) * gain + bias."""
    centers = not bool(getattr(norm, "uses_rms_norm", False))
    w = norm.weight.detach().double()
    gain = 1.0 + w if getattr(norm, "uses_weight_offset", False) else w
    comp = getattr(norm, "original_component", None)
    bias = getattr(comp, "bias", None)
    return gain, (bias.detach().double() if centers and bias is not None else None), centers


def _frozen_norm(x: Tensor, scale: Tensor, gain: Tensor, centers: bool) -> Tensor:
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

    def diff(self, target: Int[Tensor, "batch example"]) -> Float[Tensor, "component batch example"]:
        """Per component: logit of ``target`` minus the mean logit of the other labels."""
        return logit_diff(self.contrib, target)


def logit_diff(x: Float[Tensor, "... batch example n_labels"], target: Int[Tensor, "batch example"]
               ) -> Float[Tensor, "... batch example"]:
    n_labels = x.shape[-1]
    idx = target.expand(*x.shape[:-1])[..., None]
    tgt = x.gather(-1, idx)[..., 0]
    return tgt - (x.sum(-1) - tgt) / (n_labels - 1)


def _has_hook(model: Any, name: str) -> bool:
    return name in model.hook_dict


def direct_logits(model: Any, batch: PromptBatch, batch_size: int = 8, progress: bool = True) -> DirectLogits:
    """Decompose the label logits at every readout slot into per-head / per-MLP direct effects."""
    cfg = model.cfg
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    post_attn = [f"blocks.{l}.ln1_post" for l in range(n_layers) if _has_hook(model, f"blocks.{l}.ln1_post.hook_scale")]
    if post_attn and len(post_attn) != n_layers:
        raise RuntimeError("some but not all blocks have a post-attention norm; DLA does not handle this model")
    g_f, b_f, c_f = norm_affine(model.ln_final)
    W_U = model.W_U.detach().double()[:, batch.label_token_ids]  # [d_model, n_labels]
    b_U = getattr(model, "b_U", None)
    b_U = b_U.detach().double()[batch.label_token_ids] if b_U is not None else None
    names: list[str] = []
    chunks_out, logits_out = [], []
    want = ["hook_embed", "hook_pos_embed", "ln_final.hook_in", "ln_final.hook_scale", "ln_final.hook_out"]
    for l in range(n_layers):
        want += [f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_attn_out", f"blocks.{l}.hook_mlp_out"]
        if post_attn:
            want.append(f"blocks.{l}.ln1_post.hook_scale")
    want = [n for n in want if _has_hook(model, n)]
    for sub, acts in readout_activations(model, batch, want, batch_size, progress, desc="dla", stop="ln_final.hook_out"):
        st = {n: x.double() for n, x in acts.items()}
        comps, nm = [], []
        for name in ("hook_embed", "hook_pos_embed"):
            if name in st:
                comps.append(st[name])
                nm.append(name[5:])
        for l in range(n_layers):
            attn = model.blocks[l].attn
            z = st[f"blocks.{l}.attn.hook_z"]  # [b, ex, H, d_head]
            heads = torch.einsum("behd,hdm->hbem", z, attn.W_O.detach().double())  # [H, b, ex, d_model]
            b_O = getattr(attn, "b_O", None)
            parts = [heads] + ([b_O.detach().double().expand_as(heads[0])[None]] if b_O is not None else [])
            out = torch.cat(parts)
            if post_attn:  # Gemma: attn_out = RMSNorm(sum of heads + b_O); scale frozen from the run
                g, _, c = norm_affine(model.blocks[l].ln1_post)
                out = _frozen_norm(out, st[f"blocks.{l}.ln1_post.hook_scale"], g, c)
            ref = st[f"blocks.{l}.hook_attn_out"]
            err = (out.sum(0) - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
            if err > 1e-4:
                raise RuntimeError(f"layer {l}: per-head results do not sum to hook_attn_out (rel. error {err:.2e})")
            comps += list(out)
            nm += [f"L{l}H{h}" for h in range(n_heads)] + ([f"L{l}.b_O"] if b_O is not None else [])
            comps.append(st[f"blocks.{l}.hook_mlp_out"])
            nm.append(f"L{l}.mlp")
        stack = torch.stack(comps)  # [C, b, ex, d_model]
        resid = st["ln_final.hook_in"]
        err = (stack.sum(0) - resid).abs().max() / resid.abs().max()
        if err > 1e-4:
            raise RuntimeError(f"components do not sum to the final residual (rel. error {err:.2e})")
        normed = _frozen_norm(stack, st["ln_final.hook_scale"], g_f, c_f)  # like apply_ln_to_stack, plus the gain
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


def zero_shot_batch(task: Task, loaded: Any, batch: PromptBatch, template: Template | None = None) -> PromptBatch:
    """Every example of ``batch`` alone, with no demonstrations (k = 0), written with the same label words."""
    words = tuple(batch.label_words)
    cond = "default" if words == tuple(task.label_names) else f"arbitrary:{'/'.join(words)}"
    ids = batch.example_ids.reshape(-1, 1)
    return build_prompt_batch(task, loaded.tokenizer, ids, cond, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos,
                              template=template)


def zero_shot_prior(model: Any, zero_shot: PromptBatch, shape: tuple[int, int], batch_size: int = 64,
                    progress: bool = True) -> Int[Tensor, "batch example"]:
    """The label the model predicts for each input with no demonstrations (its pre-trained prior)."""
    logits = label_logits(model, zero_shot, batch_size, progress)  # [b * ex, 1, n_labels]
    return logits[:, 0].argmax(-1).reshape(shape)


def _component_frame(dl: DirectLogits) -> pd.DataFrame:
    kind = ["head" if h >= 0 else ("mlp" if n.endswith(".mlp") else "other") for n, h in zip(dl.names, dl.head)]
    return pd.DataFrame({"component": dl.names, "layer": dl.layer, "head": dl.head, "kind": kind})


def dla_table(dl: DirectLogits, batch: PromptBatch, prior: Int[Tensor, "batch example"], k_min: int = 1) -> pd.DataFrame:
    """Mean direct effect of each component on (shown label - other) and (prior label - other), k >= k_min.

    Adds a ``total`` row (the model's logit difference) per decomposition.
    """
    frames = []
    for decomp, target in [("shown", batch.shown_labels), ("prior", prior)]:
        d = dl.diff(target)[:, :, k_min:].mean((1, 2)).numpy()
        tot = logit_diff(dl.logits, target)[:, k_min:].mean().item()
        f = _component_frame(dl).assign(condition=dl.condition, decomposition=decomp, dla=d)
        frames += [f, pd.DataFrame([{"component": "total", "layer": -1, "head": -1, "kind": "total",
                                     "condition": dl.condition, "decomposition": decomp, "dla": tot}])]
    return pd.concat(frames, ignore_index=True)


def balanced_mean(x: Float[Tensor, "component batch example"], cls: Int[Tensor, "batch example"]
                  ) -> Float[Tensor, "component"]:
    """Mean over the classes present in ``cls`` of the per-class mean over queries.

    A component that pushes one label by the same amount everywhere averages to 0 this way, whatever
    the class balance of the queries."""
    means = [x[:, cls == c].mean(-1) for c in torch.unique(cls)]
    return torch.stack(means).mean(0)


def prior_vs_context(dl_default: DirectLogits, dl_flipped: DirectLogits, default: PromptBatch, flipped: PromptBatch,
                     prior: Int[Tensor, "batch example"], k_min: int = 1) -> pd.DataFrame:
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
    context = 0.25 * (logit_diff(Dd, yd) - logit_diff(Dd, yf) - logit_diff(Df, yd) + logit_diff(Df, yf))
    prior_part = 0.5 * (logit_diff(Dd, prior) + logit_diff(Df, prior))
    f = _component_frame(dl_default)
    f["context"] = balanced_mean(context[:, :, q], default.true_labels[:, q]).numpy()
    f["prior"] = balanced_mean(prior_part[:, :, q], prior[:, q]).numpy()
    f["side"] = f["context"] - f["prior"]
    f["dla_shown_default"], f["dla_shown_flipped"] = m(logit_diff(Dd, yd)), m(logit_diff(Df, yf))
    f["dla_prior_default"], f["dla_prior_flipped"] = m(logit_diff(Dd, prior)), m(logit_diff(Df, prior))
    return f
