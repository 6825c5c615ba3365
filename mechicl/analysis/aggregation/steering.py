"""Steering check: add alpha x a head's mean "flipped - default" output difference at the query readout slot.

The vector is the head's ``hook_z`` (its output before ``W_O``; adding it there equals adding
``alpha v W_O`` to the head's result) at the query readout slot, averaged over the contexts of one draw
(all demonstration labels flipped minus the same contexts with true labels). It is added, scaled by
each alpha, to that head at the query readout slot of default-label contexts of another draw; the model's
P(flipped label) among the label words and whether the flipped label is the top one are read at that slot.
Cost: vectors: one forward per context per rendering; steering: one forward per context per head per alpha
(stopped at the final norm; the alphas of one chunk run as one batch). Memory: one chunk x alphas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.analysis.engine.hooks import Head, act_name, on_device, run_to_final
from mechicl.analysis.engine.readout import readout_activations, unembed_labels
from mechicl.analysis.stats import mean_ci
from mechicl.data.names import head_name
from mechicl.data.prompts import PromptBatch


def mean_difference(
    model: Any,
    default: PromptBatch,
    flipped: PromptBatch,
    heads: Sequence[Head],
    batch_size: int = 16,
    by_class: bool = False,
) -> Float[Tensor, "head *class d_head"]:
    """Per head: mean over contexts of ``z(flipped) - z(default)`` at the query readout slot (float32, CPU);
    ``by_class``: one mean per true class of the query (``[head, n_labels, d_head]``; NaN for a class with no
    query). ``default`` and ``flipped`` must render the same contexts. Cost: one forward per context of each."""
    if not torch.equal(default.example_ids, flipped.example_ids):
        raise ValueError("mean_difference needs default and flipped renderings of the same contexts")
    names = sorted({act_name("z", l) for l, _ in heads})
    means = []
    for batch in (default, flipped):
        acc = {n: [] for n in names}
        for _, acts in readout_activations(model, batch, names, batch_size, progress=False, desc="steering vector"):
            for n in names:
                acc[n].append(acts[n][:, -1].detach().float().cpu())  # [b, H, d_head]
        means.append({n: torch.cat(v) for n, v in acc.items()})  # [b, H, d_head]
    cls = default.true_labels[:, -1]
    groups = (
        [cls == c for c in range(len(default.label_words))] if by_class else [torch.ones_like(cls, dtype=torch.bool)]
    )
    out = torch.stack(
        [
            torch.stack([(means[1][act_name("z", l)][g, h] - means[0][act_name("z", l)][g, h]).mean(0) for g in groups])
            for l, h in heads
        ]
    )  # [head, group, d_head]
    return out if by_class else out[:, 0]


@dataclass(frozen=True)
class Steering:
    """P(flipped label) and flipped-label top-1 per head, alpha and context, with the vectors used.

    ``p_flipped[i, a, b]``: head ``heads[i]`` steered by ``alphas[a]`` in context ``b``. Memory: heads x alphas x
    contexts floats."""

    p_flipped: Float[Tensor, "head alpha batch"] = field(repr=False)
    acc_flipped: Float[Tensor, "head alpha batch"] = field(repr=False)
    vectors: Float[Tensor, "head *class d_head"] = field(repr=False)
    heads: tuple[Head, ...]
    alphas: tuple[float, ...]
    query_class: Int[Tensor, "batch"] | None = field(repr=False, default=None)  # the query's true class


@torch.no_grad()
def steer(
    model: Any,
    batch: PromptBatch,
    heads: Sequence[Head],
    vectors: Float[Tensor, "head *class d_head"],
    alphas: Sequence[float],
    batch_size: int = 16,
    progress: bool = True,
) -> Steering:
    """Add ``alpha * vectors[i]`` to head ``heads[i]``'s ``hook_z`` at the query readout slot of ``batch``.

    ``vectors [head, n_labels, d_head]`` (``mean_difference(by_class=True)``): each context gets the vector of
    its query's true class. One head at a time; the query's flipped label is ``(true + 1) mod n_labels``."""
    al = torch.tensor(list(alphas), dtype=torch.float32)
    n_a = len(al)
    p_out = torch.zeros(len(heads), n_a, batch.n_contexts)
    acc_out = torch.zeros_like(p_out)
    for i, (l, h) in enumerate(tqdm(list(heads), desc="steering heads", disable=not progress, leave=False)):
        for start in range(0, batch.n_contexts, batch_size):
            sub = batch.select(slice(start, start + batch_size))
            b = sub.n_contexts
            pos = sub.readout_pos[:, -1].repeat(n_a)  # row a * b + c: alpha a, context c
            scale = al.repeat_interleave(b)
            cls = sub.true_labels[:, -1].repeat(n_a)
            vec = vectors[i] if vectors.dim() == 2 else vectors[i][cls]  # [d_head] or [rows, d_head]

            def add(
                z: Tensor, hook: Any, h: int = h, pos: Tensor = pos, scale: Tensor = scale, vec: Tensor = vec
            ) -> Tensor:
                z = z.clone()
                rows = torch.arange(z.shape[0], device=z.device)
                z[rows, pos.to(z.device), h] += scale.to(z.device, z.dtype)[:, None] * vec.to(z.device, z.dtype)
                return z

            resid = run_to_final(
                model,
                sub.tokens.repeat(n_a, 1),
                [(act_name("z", l), add)],
                attention_mask=on_device(model, sub.attention_mask.repeat(n_a, 1)),
            )
            at = resid[torch.arange(n_a * b, device=resid.device), pos.to(resid.device)]
            logits = unembed_labels(model, at, sub.label_token_ids).float().cpu().reshape(n_a, b, -1)
            flipped = (sub.true_labels[:, -1] + 1) % len(sub.label_words)
            p_out[i, :, start : start + b] = torch.softmax(logits, -1)[:, torch.arange(b), flipped]
            acc_out[i, :, start : start + b] = (logits.argmax(-1) == flipped).float()
    return Steering(
        p_out,
        acc_out,
        vectors.detach().float().cpu(),
        tuple(heads),
        tuple(float(a) for a in alphas),
        batch.true_labels[:, -1].clone(),
    )


def _slopes(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Least-squares slope of ``y [..., alpha, context]`` on ``x [alpha]``, per context."""
    xc = x - x.mean()
    return np.einsum("a,...ac->...c", xc, y - y.mean(-2, keepdims=True)) / (xc**2).sum()


def steering_tables(
    st: Steering, n_boot: int = 2000, seed: int = 0, vector: str = "pooled"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per head, alpha and query class (``all`` and each class): mean P(flipped) and flipped top-1 rate with
    bootstrap CIs over contexts;
    per head: the per-context least-squares slope per unit alpha, averaged, with its bootstrap CI). ``vector``
    names the kind of steering vector in both tables (``pooled`` or ``per_class``; its norm: mean over classes)."""
    names = [head_name(l, h) for l, h in st.heads]
    rows = []
    groups = [("all", torch.ones_like(st.query_class, dtype=torch.bool))]
    groups += [(str(int(c)), st.query_class == c) for c in torch.unique(st.query_class)]
    for what, x in (("p_flipped", st.p_flipped), ("acc_flipped", st.acc_flipped)):
        for cls, keep in groups:
            m, lo, hi = mean_ci(x[..., keep].numpy(), n_boot=n_boot, seed=seed)
            for i, name in enumerate(names):
                for a, alpha in enumerate(st.alphas):
                    rows.append(
                        {
                            "head": name,
                            "vector": vector,
                            "alpha": alpha,
                            "metric": what,
                            "query_class": cls,
                            "mean": m[i, a],
                            "ci_low": lo[i, a],
                            "ci_high": hi[i, a],
                            "n_contexts": int(keep.sum()),
                        }
                    )
    x = np.asarray(st.alphas, dtype=float)
    norm = st.vectors.norm(dim=-1)
    out = {"head": names, "vector": vector, "vector_norm": (norm if norm.dim() == 1 else norm.nanmean(-1)).numpy()}
    for what, y in (("p_flipped", st.p_flipped), ("acc_flipped", st.acc_flipped)):
        m, lo, hi = mean_ci(_slopes(y.numpy().astype(float), x), n_boot=n_boot, seed=seed)
        out |= {f"slope_{what}": m, f"slope_{what}_ci_low": lo, f"slope_{what}_ci_high": hi}
    return pd.DataFrame(rows), pd.DataFrame(out)
