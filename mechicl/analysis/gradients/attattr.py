"""AttAttr: integrated gradients over one layer's attention patterns (Hao et al. 2021), grouped by key role.

For layer ``l`` every head's pattern ``A`` (``blocks.{l}.attn.hook_pattern``) is replaced by ``alpha * A``
(a hook returning the scaled pattern; ``A`` is the run's own pattern, which does not depend on the
scaling because nothing upstream of it changes) and

    Attr(A) = A * mean_i dF/dA (alpha_i A),   alpha_i = (i - 1/2) / m   (midpoint rule),

per context, head and query -> key pair. ``F`` is the per-context metric at the query readout slot
(``integrated_gradients.label_metric``: answer - foil logit difference, or P(answer)). Completeness:
the sum over heads and pairs of layer ``l`` tends to ``F(A) - F(0 * A)`` as ``m`` grows
(``AttAttrResult.completeness``); ``F(0 * A)`` is the run with layer ``l``'s attention output made of
``b_O`` alone.

**Baselines.** ``baseline="zero"`` is Hao et al.'s path ``alpha * A``. It degenerates on models
with a norm *after* attention (Gemma-3's ``post_attention_layernorm``): ``RMSNorm(alpha y) =
RMSNorm(y)`` once ``alpha >> sqrt(eps) / rms(y)``, so ``F`` is flat on almost all of ``[0, 1]`` and
jumps within ``alpha ~ 1e-3`` of 0, where no Riemann step lands: the attributions sum to ~0 however
large ``F(A) - F(0)`` is (measured in docs/attention-attribution.md). ``baseline="uniform"`` moves
every query row from uniform causal attention ``U`` (``1 / (q + 1)`` on keys ``0..q``) to ``A``:
``U + alpha (A - U)``, rows summing to 1 all along the path, and ``Attr = (A - U) * mean_alpha dF``,
summing to ``F(A) - F(U)``. (With sliding-window layers shorter than the context, ``U`` also covers
keys outside the window.)

``key_groups`` splits the attribution at the readout slot's query row by the PromptBatch's roles
(label tokens, input tokens, template tokens, BOS, the readout slot itself) and adds the attribution
flowing through every other query row: "how much of this head's effect flows from label tokens",
which raw attention cannot say.

Cost per layer: ``(m + 2) * (L - l) / L`` forward-equivalents of the batch (blocks ``0..l-1`` are
skipped from one cached run, ``surgery.start_at``) plus as many activation-only backwards (about a
forward each), ``m + 2`` rows per context side by side. Memory: the autograd graph of
``max_rows`` rows and the ``[batch, head, pos, pos]`` patterns and attributions of the layer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.analysis.engine.hooks import act_name, capture, run_to_final, to_host
from mechicl.analysis.gradients.ig import alpha_rows, chunks, label_metric
from mechicl.data.prompts import BOS, INPUT, LABEL, TEMPLATE, PromptBatch

BASELINES = ("zero", "uniform")
GROUPS = ("label", "input", "template", "bos", "query", "other_queries")
_ROLE_GROUP = {LABEL: 0, INPUT: 1, TEMPLATE: 2, BOS: 3}


@dataclass(frozen=True)
class AttAttrResult:
    """AttAttr of one layer on a batch. ``attr``/``pattern``: ``[batch, head, query, key]`` over positions
    ``0..W-1`` (W = last query slot + 1). ``f_full`` = F(A), ``f_base`` = F(baseline) (``0 * A`` or
    uniform attention), per context, from the same hooked forward. Cost: ``forwards`` forward-equivalents and ``backwards`` backwards."""

    layer: int
    steps: int
    metric: str
    baseline: str
    attr: Float[Tensor, "batch head query key"]
    pattern: Float[Tensor, "batch head query key"]
    f_full: Float[Tensor, "batch"]
    f_base: Float[Tensor, "batch"]
    forwards: float
    backwards: float
    seconds: float

    @property
    def total(self) -> Float[Tensor, "batch"]:
        return self.attr.sum((1, 2, 3))

    @property
    def completeness(self) -> Float[Tensor, "batch"]:
        """``sum Attr - (F(A) - F(baseline))`` per context (0 in the limit of many steps)."""
        return self.total - (self.f_full - self.f_base)


def default_targets(batch: PromptBatch) -> tuple[Int[Tensor, "batch"], Int[Tensor, "batch"]]:
    """Answer = the class the query's label slot shows; foil = the next class (as ``data.pairs`` picks it)."""
    answer = batch.shown_labels[:, -1]
    return answer, (answer + 1) % len(batch.label_words)


def uniform_pattern(shape: tuple[int, ...]) -> Float[Tensor, "batch head query key"]:
    """Uniform causal attention: ``1 / (q + 1)`` on keys ``0..q`` of every query row ``q``."""
    W = shape[-1]
    u = torch.tril(torch.ones(W, W)) / torch.arange(1, W + 1, dtype=torch.float32)[:, None]
    return u.expand(shape)


def _scaled_run(
    model: Any,
    tokens: Tensor,
    pattern: Tensor,
    base: Tensor,
    resid: Tensor | None,
    layer: int,
    a: Tensor,
    batch: PromptBatch,
    answer: Tensor,
    foil: Tensor,
    metric: str,
) -> tuple[Tensor, Tensor]:
    """F and dF/d(pattern) at ``base + alpha (pattern - base)`` for the ``alpha`` values ``a``, rows
    alpha-major: ``[n, b]``, ``[n, b, H, W, W]``."""
    n, b = len(a), tokens.shape[0]
    path = base[None] + a.to(pattern.device)[:, None, None, None, None] * (pattern - base)[None]
    leaf = path.reshape(n * b, *pattern.shape[1:]).requires_grad_(True)

    def scaled(x: Tensor, hook: Any) -> Tensor:
        if x.shape != leaf.shape:
            raise RuntimeError(f"{hook.name} has shape {tuple(x.shape)}, expected {tuple(leaf.shape)}")
        return leaf.to(x.dtype)

    start = (layer, resid.repeat(n, 1, 1)) if resid is not None else None
    with torch.enable_grad():
        out = run_to_final(model, tokens.repeat(n, 1), [(act_name("pattern", layer), scaled)], start=start)
        q = batch.readout_pos[:, -1].repeat(n)
        f = label_metric(
            model, out[torch.arange(n * b), q], batch.label_token_ids, answer.repeat(n), foil.repeat(n), metric
        )
        (g,) = torch.autograd.grad(f.sum(), leaf)
    return f.detach().view(n, b), g.view(n, b, *pattern.shape[1:])


def attattr(
    model: Any,
    batch: PromptBatch,
    answer: Int[Tensor, "batch"] | None = None,
    foil: Int[Tensor, "batch"] | None = None,
    layers: Sequence[int] | None = None,
    steps: int = 20,
    metric: str = "logit_diff",
    baseline: str = "zero",
    max_rows: int = 64,
    progress: bool = False,
) -> list[AttAttrResult]:
    """AttAttr of each of ``layers`` (default all) at the query readout slot of ``batch``.

    ``answer``/``foil``: class indices per context (default ``default_targets``; for a ``PatchPair``
    pass ``pair.clean, pair.answer, pair.foil``). Cost: one cached forward, then per layer the module
    docstring's ``(m + 2) (L - l) / L`` forwards and as many backwards. ``baseline``: ``zero`` (Hao et al.)
    or ``uniform`` (see the module docstring; use it for models with a post-attention norm).
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if answer is None or foil is None:
        answer, foil = default_targets(batch)
    L = int(model.cfg.n_layers)
    layers = list(range(L)) if layers is None else [int(l) for l in layers]
    W = int(batch.readout_pos[:, -1].max()) + 1  # later positions cannot reach the query slot
    tokens = batch.tokens[:, :W]
    store: dict[str, Tensor] = {}
    names = [act_name("pattern", l) for l in layers] + [act_name("resid_pre", l) for l in layers if l > 0]
    with torch.no_grad():
        run_to_final(model, tokens, capture(names, store))
    a = alpha_rows(steps)
    return [
        _layer_attattr(model, tokens, store, l, a, batch, (answer, foil), metric, baseline, max_rows, len(layers))
        for l in tqdm(layers, desc="attattr", unit="layer", disable=not progress, leave=False)
    ]


def _layer_attattr(
    model: Any,
    tokens: Tensor,
    store: dict[str, Tensor],
    l: int,
    a: Tensor,
    batch: PromptBatch,
    targets: tuple[Tensor, Tensor],
    metric: str,
    baseline: str,
    max_rows: int,
    n_layers_asked: int,
) -> AttAttrResult:
    """One layer's path integral: its pattern scaled from the baseline along ``a`` (chunks of ``max_rows``)."""
    t0 = time.perf_counter()
    steps, L, b = len(a) - 2, int(model.cfg.n_layers), batch.n_contexts
    A = store[act_name("pattern", l)].float()
    A0 = torch.zeros_like(A) if baseline == "zero" else uniform_pattern(A.shape).to(A.device)
    resid = store.get(act_name("resid_pre", l))
    fs, gs = [], []
    for sl in chunks(len(a), max_rows // b):
        f, g = _scaled_run(model, tokens, A, A0, resid, l, a[sl], batch, *targets, metric)
        fs.append(f)
        gs.append(g)
    f, g = torch.cat(fs), torch.cat(gs)  # [m + 2, b], [m + 2, b, H, W, W]
    attr = to_host((A - A0) * g[:steps].mean(0))
    cost = len(a) * (L - l) / L
    return AttAttrResult(
        l,
        steps,
        metric,
        baseline,
        attr,
        to_host(A),
        f[-1],
        f[-2],
        cost + 1 / n_layers_asked,
        cost,
        time.perf_counter() - t0,
    )


def key_group_index(batch: PromptBatch, width: int) -> Int[Tensor, "batch key"]:
    """Group (index into ``GROUPS``) of every key position for the last readout slot; -1 after the slot."""
    roles = batch.roles[:, :width]
    g = torch.full(roles.shape, -1, dtype=torch.long)
    for role, i in _ROLE_GROUP.items():
        g[roles == role] = i
    q = batch.readout_pos[:, -1]
    pos = torch.arange(width)[None]
    g[pos == q[:, None]] = GROUPS.index("query")
    g[pos > q[:, None]] = -1
    return g


def group_masses(
    r: AttAttrResult, batch: PromptBatch
) -> tuple[Float[Tensor, "batch head group"], Float[Tensor, "batch head group"]]:
    """Attribution and raw attention per key group (``GROUPS``) at the last readout slot; the
    ``other_queries`` group holds the attribution of every other query row (its attention is NaN)."""
    b, H, W, _ = r.attr.shape
    rows, q = torch.arange(b), batch.readout_pos[:, -1]
    at_q, pat_q = r.attr[rows, :, q], r.pattern[rows, :, q]  # [b, H, W]
    onehot = torch.nn.functional.one_hot(key_group_index(batch, W).clamp(min=0), len(GROUPS)).float()
    onehot = onehot * (key_group_index(batch, W) >= 0)[..., None]  # [b, W, G]
    attr_g = torch.einsum("bhk,bkg->bhg", at_q, onehot)
    att_g = torch.einsum("bhk,bkg->bhg", pat_q, onehot)
    other = GROUPS.index("other_queries")
    attr_g[..., other] = r.attr.sum((2, 3)) - at_q.sum(-1)
    att_g[..., other] = float("nan")
    return attr_g, att_g


def head_groups(results: Sequence[AttAttrResult], batch: PromptBatch) -> pd.DataFrame:
    """Tidy: layer, head, group, attribution and attention (means over contexts), attribution_share
    (of the head's total |attribution| summed over groups)."""
    frames = []
    for r in results:
        attr_g, att_g = (x.mean(0).numpy() for x in group_masses(r, batch))  # [H, G]
        H, G = attr_g.shape
        share = attr_g / np.maximum(np.abs(attr_g).sum(-1, keepdims=True), 1e-12)
        frames.append(
            pd.DataFrame(
                {
                    "layer": r.layer,
                    "head": np.repeat(np.arange(H), G),
                    "group": np.tile(GROUPS, H),
                    "attribution": attr_g.ravel(),
                    "attribution_share": share.ravel(),
                    "attention": att_g.ravel(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def completeness_table(results: Sequence[AttAttrResult]) -> pd.DataFrame:
    """Per layer: steps, baseline, sum of attributions, F(A) - F(baseline), residual (means over contexts), max |residual|."""
    return pd.DataFrame(
        [
            {
                "layer": r.layer,
                "steps": r.steps,
                "baseline": r.baseline,
                "sum_attr": float(r.total.mean()),
                "f_full_minus_f_base": float((r.f_full - r.f_base).mean()),
                "residual": float(r.completeness.mean()),
                "max_abs_residual": float(r.completeness.abs().max()),
                "forwards": r.forwards,
                "backwards": r.backwards,
            }
            for r in results
        ]
    )
