"""Integrated gradients along the patching path, flipped-label (corrupted) -> correct-label (clean) run.

For layer ``l`` two things move on the straight line from the corrupted run to the clean run, both
cached once per run (``patching.Patcher.cached``):

* every head's output ``z_h`` (``blocks.{l}.attn.hook_z``), and
* the residual stream entering the layer (``blocks.{l}.hook_resid_pre``; "the rest": everything
  earlier layers and the embeddings wrote). The attention reads its own input, but its output is
  replaced by the interpolated ``z``, so the residual's gradient is its skip path only.

Everything downstream is a function of these inputs, so at ``alpha = 1`` the run *is* the clean run
and at ``alpha = 0`` the corrupted one, and IG's completeness reads: per layer,

    sum_h IG(z_h) + IG(rest) = M(clean) - M(corrupted) = 1,

with ``M`` the normalised logit difference of ``analysis.patching.exact`` (0 = corrupted, 1 = clean; batch
mean) and ``IG(x) = sum (x_clean - x_corrupted) * mean_i dM/dx (x(alpha_i))`` over contexts,
positions and features, midpoint rule (``integrated_gradients``). ``IG(z_h)`` estimates head
``h``'s share of the layer's denoising effect, interactions with the other heads of the layer included
(exact single-head patching leaves the other heads corrupted).

Cost per layer: ``(m + 2) * (L - l) / L`` forward-equivalents of the pair's batch (blocks ``0..l-1`` are
skipped, ``surgery.start_at``) plus as many activation-only backwards; two cached forwards (clean,
corrupted) for all layers. Memory: the autograd graph of ``max_rows`` rows, plus ``z`` and the residual
of every layer for both runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.analysis.engine.hooks import act_name, run_to_final, to_host
from mechicl.analysis.gradients.ig import alpha_rows, chunks, label_metric
from mechicl.analysis.patching.exact import Patcher, normalise
from mechicl.data.pairs import PatchPair


@dataclass(frozen=True)
class PathIGResult:
    """Path IG per head and layer. ``heads[l, h]`` = IG of head ``h``'s output in layer ``l``;
    ``rest[l]`` = IG of the residual entering layer ``l``; ``endpoints[l]`` = M at alpha = 0 and 1 along
    the path (0 and 1 when the interpolation reproduces the runs). Layers not run hold NaN.
    Cost: ``forwards`` forward-equivalents and ``backwards`` backwards of the batch."""

    steps: int
    heads: Float[Tensor, "layer head"]
    rest: Float[Tensor, "layer"]
    endpoints: Float[Tensor, "layer 2"]
    forwards: float
    backwards: float
    seconds: float

    @property
    def total(self) -> Float[Tensor, "layer"]:
        return self.heads.sum(-1) + self.rest

    @property
    def residual(self) -> Float[Tensor, "layer"]:
        """``sum_h IG(z_h) + IG(rest) - (M(clean) - M(corrupted))``; the target is 1 on the normalised scale."""
        return self.total - 1.0

    def table(self) -> pd.DataFrame:
        """Tidy: layer, head, ig (one row per head)."""
        L, H = self.heads.shape
        return pd.DataFrame(
            {
                "layer": np.repeat(np.arange(L), H),
                "head": np.tile(np.arange(H), L),
                "ig": self.heads.reshape(-1).numpy(),
            }
        )

    def completeness(self) -> pd.DataFrame:
        """Per layer: steps, heads' sum, rest, total, residual (total - 1), the path's endpoints."""
        return pd.DataFrame(
            {
                "layer": np.arange(len(self.rest)),
                "steps": self.steps,
                "heads_sum": self.heads.sum(-1).numpy(),
                "rest": self.rest.numpy(),
                "total": self.total.numpy(),
                "residual": self.residual.numpy(),
                "m_start": self.endpoints[:, 0].numpy(),
                "m_end": self.endpoints[:, 1].numpy(),
            }
        )


def _interpolated_run(
    model: Any,
    pair: PatchPair,
    tokens: Tensor,
    layer: int,
    a: Tensor,
    z: tuple[Tensor, Tensor],
    r: tuple[Tensor, Tensor],
    base: tuple[Tensor, Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """M and its gradients w.r.t. the interpolated ``z`` and residual for the ``alpha`` values ``a``.

    ``z``/``r`` = (corrupted, clean) activations; rows alpha-major. Returns M ``[n]``,
    dM/dz ``[n, b, pos, H, d]``, dM/dr ``[n, b, pos, d_model]``.
    """
    n, b = len(a), pair.n_contexts

    def line(x: tuple[Tensor, Tensor]) -> Tensor:
        c, k = x[0].float(), x[1].float()
        shape = (n,) + (1,) * c.dim()
        return (c[None] + a.to(c.device).view(shape) * (k - c)[None]).reshape(n * b, *c.shape[1:]).requires_grad_(True)

    zl, rl = line(z), line(r)

    def put(leaf: Tensor) -> Any:
        def hook(x: Tensor, hook: Any) -> Tensor:
            if x.shape != leaf.shape:
                raise RuntimeError(f"{hook.name} has shape {tuple(x.shape)}, expected {tuple(leaf.shape)}")
            return leaf.to(x.dtype)

        return hook

    hooks = [(act_name("resid_pre", layer), put(rl)), (act_name("z", layer), put(zl))]
    start = (layer, rl.detach()) if layer > 0 else None  # blocks 0..l-1 skipped; the hook sets the residual
    with torch.enable_grad():
        out = run_to_final(model, tokens.repeat(n, 1), hooks, start=start)
        resid_q = out[torch.arange(n * b), pair.query_pos.repeat(n)]
        ld = label_metric(model, resid_q, pair.clean.label_token_ids, pair.answer.repeat(n), pair.foil.repeat(n))
        m = normalise(ld.view(n, b), *base)  # [n]
        gz, gr = torch.autograd.grad(m.sum(), [zl, rl])
    return m.detach(), gz.view(n, *z[0].shape), gr.view(n, *r[0].shape)


def path_ig(
    model: Any,
    pair: PatchPair,
    steps: int = 20,
    layers: Sequence[int] | None = None,
    max_rows: int = 32,
    patcher: Patcher | None = None,
    progress: bool = False,
) -> PathIGResult:
    """IG of every head output and of the rest, per layer, from the corrupted to the clean run.

    ``patcher``: reuse a ``Patcher``'s cached runs (and its baselines). Cost: see the module docstring.
    """
    t0 = time.perf_counter()
    p = patcher or Patcher(model, pair, max_rows=max_rows)
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    layers = list(range(L)) if layers is None else [int(l) for l in layers]
    names = [act_name(k, l) for l in layers for k in ("z", "resid_pre")]
    f0 = p.forwards
    clean, corr = p.cached("clean", names), p.cached("corrupted", names)
    base = (p.baseline("clean"), p.baseline("corrupted"))
    tokens = pair.corrupted.tokens[:, : p.width]
    a = alpha_rows(steps)
    heads, rest = torch.full((L, H), float("nan")), torch.full((L,), float("nan"))
    ends, fw = torch.full((L, 2), float("nan")), p.forwards - f0
    bw = 0.0
    for l in tqdm(layers, desc="path IG", unit="layer", disable=not progress, leave=False):
        zn, rn = act_name("z", l), act_name("resid_pre", l)
        z, r = (corr[zn], clean[zn]), (corr[rn], clean[rn])
        ms, gzs, grs = [], [], []
        for sl in chunks(len(a), max_rows // pair.n_contexts):
            m, gz, gr = _interpolated_run(model, pair, tokens, l, a[sl], z, r, base)
            ms.append(m)
            gzs.append(gz)
            grs.append(gr)
        m, gz, gr = torch.cat(ms), torch.cat(gzs)[:steps].mean(0), torch.cat(grs)[:steps].mean(0)
        heads[l] = to_host(((z[1] - z[0]).float() * gz).sum((0, 1, 3)))  # [b, pos, H, d] -> [H]
        rest[l] = to_host(((r[1] - r[0]).float() * gr).sum())
        ends[l] = m[-2:]
        fw += len(a) * (L - l) / L
        bw += len(a) * (L - l) / L
    return PathIGResult(steps, heads, rest, ends, fw, bw, time.perf_counter() - t0)


def completeness_curve(
    model: Any,
    pair: PatchPair,
    steps: Sequence[int] = (1, 5, 20, 50),
    layers: Sequence[int] | None = None,
    max_rows: int = 32,
) -> pd.DataFrame:
    """``PathIGResult.completeness()`` for each number of steps (one shared ``Patcher``), stacked."""
    p = Patcher(model, pair, max_rows=max_rows)
    frames = [path_ig(model, pair, m, layers, max_rows, patcher=p).completeness() for m in steps]
    out = pd.concat(frames, ignore_index=True)
    return out[out.total.notna()].reset_index(drop=True)
