"""Evidence aggregation: each candidate head's output at the query readout slot, projected on the label
direction, as the number and placement of flipped demonstration labels varies (``data.evidence``).

**The projection** is the head's direct logit attribution (the convention of ``analysis.inside.dla``) on
``logit(flipped label) - logit(true label)`` of the query: ``z_h @ W_O[h]`` (through the post-attention
norm with its scale frozen from the run, Gemma-3), then the final norm with its scale frozen from the
same run and its gain applied, then ``W_U[:, flipped] - W_U[:, true]`` (the model's own unembedding of
the two label tokens). Positive = pushes the query toward the flipped map. ``delta`` is the projection
minus the same context's projection with no label flipped (paired per context).

The model's own answer is scored from the same forwards: P(flipped label) among the label words and
whether it is the argmax. Cost: one forward per context per rendering (stopped after the final norm,
no unembedding); memory: the captured activations at the readout slots of one chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.analysis.engine.hooks import FINAL, Head, act_name
from mechicl.analysis.engine.readout import readout_activations, unembed_labels
from mechicl.analysis.inside.dla import norm_affine
from mechicl.analysis.stats import mean_ci
from mechicl.data.evidence import EvidenceBatches
from mechicl.data.names import head_name
from mechicl.data.prompts import PromptBatch


@dataclass(frozen=True)
class Projections:
    """Per rendering, context and head: the head's direct effect on logit(flipped) - logit(true) at the query,
    through the final norm with the scale of the same context's rendering with no flipped label (``project_heads``).

    ``values[r, b, i]`` for head ``heads[i]``; ``p_flipped[r, b]`` and ``acc_flipped[r, b]`` are the model's
    P(flipped label) among the label words and whether it is the top label. ``flips[r, b, j]``: demonstration
    j shows a flipped label. Memory: renderings x contexts x heads floats.
    """

    values: Float[Tensor, "rendering batch head"] = field(repr=False)
    p_flipped: Float[Tensor, "rendering batch"] = field(repr=False)
    acc_flipped: Float[Tensor, "rendering batch"] = field(repr=False)
    flips: Bool[Tensor, "rendering batch demo"] = field(repr=False)
    heads: tuple[Head, ...]
    placement: tuple[str, ...]
    count: tuple[int, ...]
    query_class: Int[Tensor, "batch"] | None = field(repr=False, default=None)  # the query's true class
    # the model's own logit(flipped) - logit(true) at the query readout slot, per rendering and context
    ld_flipped: Float[Tensor, "rendering batch"] | None = field(repr=False, default=None)
    # each head's hook_z at the query readout slot (the donor of ``aggregation_total.total_effects``)
    z: Float[Tensor, "rendering batch head d_head"] | None = field(repr=False, default=None)
    measure: str = "direct"  # "direct" (this module) or "total" (``aggregation_total``)

    @property
    def delta(self) -> Float[Tensor, "rendering batch head"]:
        """The projection minus the same context's projection with no label flipped (rendering 0)."""
        return self.values - self.values[:1]


def _frozen(x: Tensor, scale: Tensor, norm: Any) -> Tensor:
    """A norm with its scale frozen from the run (linear in x): ``center(x) / scale * gain``."""
    gain, _, centers = norm_affine(norm)
    if centers:
        x = x - x.mean(-1, keepdim=True)
    return x / scale * gain


def query_projection(
    model: Any, batch: PromptBatch, heads: Sequence[Head], batch_size: int = 16, progress: bool = False
) -> tuple[
    Float[Tensor, "batch head"],
    Float[Tensor, "batch n_labels"],
    Float[Tensor, "batch"],
    Float[Tensor, "batch head d_head"],
]:
    """(each head's DLA on logit(flipped) - logit(true) at the query readout slot, the label logits there,
    the final norm's scale there, each head's ``hook_z`` there (float32)). Cost: one forward per context, stopped
    after the final norm. Float64 on the CPU after capture."""
    layers = sorted({l for l, _ in heads})
    post = f"blocks.{layers[0]}.ln1_post.hook_scale" in model.hook_dict if layers else False
    names = [FINAL, "ln_final.hook_scale", *(act_name("z", l) for l in layers)]
    names += [f"blocks.{l}.ln1_post.hook_scale" for l in layers] if post else []
    W_U = model.W_U.detach()
    out, logits, scales, zs = [], [], [], []
    for sub, acts in readout_activations(
        model, batch, names, batch_size, progress, desc="projection", stop="ln_final.hook_out"
    ):
        st = {n: a[:, -1].detach().cpu().double() for n, a in acts.items()}  # the query's readout slot
        zs.append(
            torch.stack([acts[act_name("z", l)][:, -1, h].detach().float().cpu() for l, h in heads], 1)
            if heads
            else torch.zeros(sub.n_contexts, 0, 0)
        )
        true = sub.true_labels[:, -1]
        flipped = (true + 1) % len(sub.label_words)
        ids = sub.label_token_ids.to(W_U.device)
        direction = (W_U[:, ids[flipped]] - W_U[:, ids[true]]).T.cpu().double()  # [b, d_model]
        cols = []
        for l, h in heads:
            attn = model.blocks[l].attn
            o = st[act_name("z", l)][:, h] @ attn.W_O[h].detach().cpu().double()  # [b, d_model]
            if post:
                o = _frozen(o, st[f"blocks.{l}.ln1_post.hook_scale"], model.blocks[l].ln1_post)
            o = _frozen(o, st["ln_final.hook_scale"], model.ln_final)
            cols.append((o * direction).sum(-1))
        out.append(torch.stack(cols, -1) if cols else torch.zeros(sub.n_contexts, 0, dtype=torch.float64))
        scales.append(st["ln_final.hook_scale"].reshape(-1))
        logits.append(unembed_labels(model, acts[FINAL][:, -1], sub.label_token_ids).detach().cpu().double())
    return torch.cat(out), torch.cat(logits), torch.cat(scales), torch.cat(zs)


def project_heads(
    model: Any, ev: EvidenceBatches, heads: Sequence[Head], batch_size: int = 16, progress: bool = True
) -> Projections:
    """``query_projection`` on every rendering of ``ev``; keeps each head's ``hook_z`` at the query slot (the donors
    of ``aggregation_total``). Cost: one forward per context per rendering."""
    vals, p, acc, ld, scales, zs = [], [], [], [], [], []
    for batch in tqdm(ev.batches, desc="evidence renderings", disable=not progress, leave=False):
        v, logits, scale, z = query_projection(model, batch, heads, batch_size)
        scales.append(scale)
        zs.append(z)
        true = batch.true_labels[:, -1]
        flipped = (true + 1) % len(batch.label_words)
        rows = torch.arange(batch.n_contexts)
        p.append(torch.softmax(logits, -1)[rows, flipped])
        acc.append((logits.argmax(-1) == flipped).double())
        ld.append(logits[rows, flipped] - logits[rows, true])
        vals.append(v)
    scale = torch.stack(scales)  # [r, b]: the final norm's scale differs between renderings; fix it at rendering 0
    values = torch.stack(vals) * (scale / scale[:1])[..., None]
    true = ev.default.true_labels[:, -1]
    return Projections(
        values,
        torch.stack(p),
        torch.stack(acc),
        ev.flips,
        tuple(heads),
        ev.placement,
        ev.count,
        true,
        torch.stack(ld),
        torch.stack(zs),
    )


def curves(proj: Projections, n_boot: int = 1000, seed: int = 0, model_series: bool = True) -> pd.DataFrame:
    """Mean ``delta`` per head (``measure`` = ``proj.measure``) and, with ``model_series`` (``measure`` = ``model``),
    the model's P(flipped), accuracy toward the flipped map and change of logit(flipped) - logit(true) (``ld_flipped``)
    per (placement, count), over all contexts and per query class, with percentile-bootstrap CIs over contexts
    (``resampling.mean_ci``). The ``none`` / ``all`` renderings are repeated under every placement so that each
    placement's curve runs from 0 to k."""
    series = {head_name(l, h): (proj.measure, proj.delta[..., i]) for i, (l, h) in enumerate(proj.heads)}
    if model_series:
        series |= {"p_flipped": ("model", proj.p_flipped), "acc_flipped": ("model", proj.acc_flipped)}
        if proj.ld_flipped is not None:
            series["ld_flipped"] = ("model", proj.ld_flipped - proj.ld_flipped[:1])
    rows = []
    groups = [("all", torch.ones_like(proj.query_class, dtype=torch.bool))]
    groups += [(str(int(c)), proj.query_class == c) for c in torch.unique(proj.query_class)]
    for name, (measure, x) in series.items():
        for cls, keep in groups:
            mean, lo, hi = mean_ci(x[:, keep].numpy(), n_boot=n_boot, seed=seed)  # per rendering, contexts resampled
            for r, (pl, m) in enumerate(zip(proj.placement, proj.count)):
                for shown in [pl] if pl not in ("none", "all") else sorted(set(proj.placement) - {"none", "all"}):
                    rows.append(
                        {
                            "series": name,
                            "measure": measure,
                            "query_class": cls,
                            "placement": shown,
                            "count": m,
                            "mean": mean[r],
                            "ci_low": lo[r],
                            "ci_high": hi[r],
                            "n_contexts": int(keep.sum()),
                        }
                    )
    return pd.DataFrame(rows)
