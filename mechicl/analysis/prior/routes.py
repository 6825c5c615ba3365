"""Route patching at the readout slot: through which positions the flipped-vs-correct difference arrives (issue 28).

A readout slot ``s`` (example ``e = k_min + s``) predicts example ``e``'s label. Its residual stream learns about
earlier positions only through attention. **Route patching** re-runs the slot in the receiver rendering while,
in every layer, its attention reads the donor rendering's keys and values at one set of source positions and the
receiver's everywhere else (``SlotStepper.run_mixed``): the slot's own residual recomputes, every other position
stays exactly as the receiver had it. The routes (source positions, per slot, from the ``PromptBatch`` fields):

- ``labels``: the demonstrations' label tokens before the slot (``label_pos[:, :e]``);
- ``query``: the query's own input tokens (``input_spans[:, e]``), the prior's path: what the slot reads about the
  query itself (the renderings differ there only by what those positions have read from earlier labels);
- ``rest``: every other position before the slot (BOS, template tokens, the demonstrations' inputs);
- ``all``: every position before the slot. The slot's own token is the same in both renderings, so this run
  equals the donor run exactly: the self-check (``RouteResult.check``).

**Metric**: ``LD = logit(true class) - logit(foil)`` over the label words at the slot, the foil being the class the
flipped rendering shows for the query. Per slot, ``gap = LD_correct - LD_flipped``. A route **carries**
``LD_correct - LD_route`` of it (direction ``noise``: receiver correct, donor flipped) or ``LD_route - LD_flipped``
(``denoise``: receiver flipped, donor correct); its **share** over a group of slots is the ratio of means
``mean carried / mean gap``, and ``interaction = 1 - (labels + query + rest)`` is what arrives only when routes
combine (0 when they add up).

**Through heads**: the ``labels`` route restricted to a head set: that set's output (``hook_z``) at the slot in the
route-patched run, written into the receiver's re-run with everything downstream recomputed: the part of the label
route the set carries (the rest goes through other heads or needs them together).

CIs: 95% cluster bootstrap over contexts (a context's slots resampled together), numerator and gap resampled
together (``stats.ratio_ci``), widened by the shared-row design effect of the contexts' task rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechicl.analysis.engine.hooks import Head, fmt_heads, head_masks
from mechicl.analysis.engine.slots import SlotStepper
from mechicl.analysis.prior.moderation import BINS, bin_labels, logit_diff
from mechicl.analysis.stats import ratio_ci

ROUTES = ("labels", "query", "rest", "all")
DIRECTIONS = ("noise", "denoise")


def route_sources(st: SlotStepper, route: str) -> Bool[Tensor, "batch slot width"]:
    """The source positions of ``route`` for every slot, as columns of the stepper's left-padded layout."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    bt, k0, W = st.batch, st.k_min, st.width
    b, S = st.pos.shape
    pos = torch.arange(W)[None, None] - st.layout.offset[:, None, None]  # [b, 1, W]: token position of each column
    before = (pos >= 0) & (pos < st.pos[:, :, None]) & st.layout.mask[:, None].bool()  # [b, S, W]
    labels = torch.zeros(b, S, W, dtype=torch.bool)
    for s in range(S):
        labels[:, s] = (pos[:, 0, :, None] == bt.label_pos[:, None, : k0 + s]).any(-1)
    span = bt.input_spans[:, k0:]  # [b, S, 2]
    query = (pos >= span[..., :1]) & (pos < span[..., 1:])
    if route == "labels":
        return labels & before
    if route == "query":
        return query & before
    if route == "rest":
        return before & ~labels & ~query
    return before


@dataclass(frozen=True)
class RouteResult:
    """Per-slot LDs of the route-patched runs. ``names``: the routes, then ``labels via <heads>`` per head set."""

    direction: str
    names: tuple[str, ...]
    ld: Float[np.ndarray, "route batch slot"]
    ld_correct: Float[np.ndarray, "batch slot"]
    ld_flipped: Float[np.ndarray, "batch slot"]
    k: Int[np.ndarray, "slot"]
    items: np.ndarray  # [b, n_examples] task rows: the shared-row design effect

    @property
    def gap(self) -> Float[np.ndarray, "batch slot"]:
        return self.ld_correct - self.ld_flipped

    @property
    def carried(self) -> Float[np.ndarray, "route batch slot"]:
        """The part of each slot's gap a route carries (LD units; towards the donor)."""
        if self.direction == "noise":
            return self.ld_correct[None] - self.ld
        return self.ld - self.ld_flipped[None]

    def check(self, atol: float = 1e-3) -> float:
        """Largest |carried(all) - gap| relative to max(1, max |LD|): ``all`` must equal the donor run."""
        err = np.abs(self.carried[self.names.index("all")] - self.gap).max()
        return float(err / max(1.0, np.abs(self.ld_correct).max(), np.abs(self.ld_flipped).max()))


@torch.no_grad()
def route_patch(
    correct: SlotStepper, flipped: SlotStepper, *, through: Sequence[Sequence[Head]] = (), direction: str = "noise"
) -> RouteResult:
    """Route-patch every slot of ``correct`` / ``flipped`` (two renderings of the same contexts) in ``direction``.

    Cost: one ``SlotStepper.run_mixed`` of the 4 routes (``4 S`` one-token steps per context, in chunks) plus one
    re-run of every head set (``S`` steps each; KV path, full forwards otherwise); memory: the joined cache (both
    renderings' caches again) and one chunk."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    recv, donor = (correct, flipped) if direction == "noise" else (flipped, correct)
    true = correct.true_labels
    foil = flipped.batch.shown_labels[:, correct.k_min :]
    layers = sorted({l for s in through for l, _ in s})
    sources = torch.stack([route_sources(recv, r) for r in ROUTES])  # [route, b, S, W]: every route in one re-run
    logits, z = recv.run_mixed(donor, sources, keep_z=layers)
    names, lds = list(ROUTES), list(logit_diff(logits, true, foil))
    if through:
        src = recv.z.clone()  # [b, S, L, H, d]: the label route's head outputs at the slots
        for l in layers:
            src[:, :, l] = z[l][ROUTES.index("labels")].to(src.dtype)
        logits = recv.run(head_masks(through, recv.n_layers, recv.n_heads), src)  # [n, b, S, labels]
        names += [f"labels via {fmt_heads(s)}" for s in through]
        lds += list(logit_diff(logits, true, foil))
    return RouteResult(
        direction=direction,
        names=tuple(names),
        ld=np.stack(lds),
        ld_correct=logit_diff(correct.base_logits, true, foil),
        ld_flipped=logit_diff(flipped.base_logits, true, foil),
        k=np.arange(correct.k_min, correct.k_min + correct.n_slots),
        items=correct.batch.example_ids.numpy(),
    )


def route_table(
    res: RouteResult,
    prior: Float[np.ndarray, "batch slot"] | None = None,
    *,
    bins: Sequence[float] = BINS,
    k_groups: Sequence[tuple[int, int]] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (k group, prior bin, route): the route's share of the gap with a CI, and the bin's gap.

    ``prior``: each slot's prior strength (``moderation.prior_strength``); None pools every slot (bin "all").
    Rows also carry ``interaction`` (1 - labels - query - rest). Groups with fewer than 2 contexts are dropped."""
    b, S = res.gap.shape
    groups = list(k_groups) if k_groups is not None else [(int(k), int(k)) for k in res.k]
    which = np.zeros((b, S), int) if prior is None else np.digitize(prior, np.asarray(bins)[1:-1])
    names = ["all"] if prior is None else bin_labels(bins)
    carried = res.carried
    parts = [res.names.index(r) for r in ("labels", "query", "rest")]
    rows = []
    for lo, hi in groups:
        in_k = (res.k >= lo) & (res.k <= hi)
        for j, name in enumerate(names):
            r, c = np.nonzero((which == j) & in_k[None])
            if len(np.unique(r)) < 2:
                continue
            ctx = np.unique(r)
            gap = res.gap[r, c]
            kw = dict(n_boot=n_boot, seed=seed, clusters=r, items=res.items[ctx])  # a context's slots together
            base = {"k_lo": lo, "k_hi": hi, "prior_bin": name, "n_slots": len(r), "n_contexts": len(ctx)}
            base["gap"], base["ld_flipped"] = float(gap.mean()), float(res.ld_flipped[r, c].mean())
            inter = gap - sum(carried[i][r, c] for i in parts)
            for route, x in [*((n, carried[i][r, c]) for i, n in enumerate(res.names)), ("interaction", inter)]:
                est, l_, h_ = ratio_ci(x, gap, **kw)
                rows.append({**base, "route": route, "share": float(est), "ci_low": float(l_), "ci_high": float(h_)})
    return pd.DataFrame(rows)
