"""Where label information sits: residual patching at position *sets*, and per-head pattern vs value patching.

The label-anchor test of Wang et al. (2023), on a ``PatchPair`` (clean = correct labels,
corrupted = flipped labels; only label tokens differ):

* ``patch_position_sets``: the residual stream entering block ``l`` patched at **all positions of
  one set at once** -- the demonstration ``label`` positions (``label_pos[:, :-1]``), every
  ``input`` token (``input_spans``, the query's input included), the query ``readout`` slot
  (``readout_pos[:, -1]``) or ``all`` positions -- layer by layer, in either direction. At layer 0
  the runs differ only at label tokens, so ``label`` there recovers the donor run exactly; ``all``
  recovers it at every layer (both tested).
* ``patch_head_parts``: one head at a time, its output ``z`` **recomputed** with the donor's
  attention to the label positions (``pattern``: the donor's query-key weights on the label
  sources, the receiver's values) or with the donor's values at the label positions (``value``:
  the receiver's pattern). With grouped-query attention several query heads share one KV head;
  patching ``hook_v`` would move them all, so the value patch recomputes only that query head's
  ``z`` from its own (receiver) pattern and the donor's values of its KV group.

The metric is exact patching's (``patching.cells.readout_ld``): the answer - foil logit difference at the query
slot, normalised 0 = corrupted, 1 = clean. Caches and baselines come from a ``patching.exact.Patcher``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.analysis.engine.hooks import Head, act_name, run_to_final
from mechicl.analysis.patching.cells import readout_ld
from mechicl.analysis.patching.exact import Patcher
from mechicl.analysis.patching.kinds import runs_for
from mechicl.analysis.patching.result import PatchResult, cell_table, normalise
from mechicl.analysis.stats import ratio_ci
from mechicl.data.pairs import PatchPair

POSITION_SETS = ("label", "input", "readout", "all")
PARTS = ("pattern", "value")


def position_mask(pair: PatchPair, which: str, width: int) -> Bool[Tensor, "batch pos"]:
    """Positions ``< width`` of one set, from the PromptBatch fields (never re-derived)."""
    if which not in POSITION_SETS:
        raise ValueError(f"position set must be one of {POSITION_SETS}, got {which!r}")
    b = pair.clean
    m = torch.zeros(b.n_contexts, width, dtype=torch.bool)
    rows = torch.arange(b.n_contexts)[:, None]
    if which == "label":
        m[rows, b.label_pos[:, :-1]] = True  # demonstration labels only (all before the query slot)
    elif which == "input":
        pos = torch.arange(width)
        spans = b.input_spans  # [batch, example, 2], [start, end)
        m = ((pos[None, None] >= spans[..., :1]) & (pos[None, None] < spans[..., 1:])).any(1)
    elif which == "readout":
        m[torch.arange(b.n_contexts), pair.query_pos] = True
    else:
        m[:] = True
    return m


@dataclass(frozen=True)
class PositionSetResult:
    """Residual patching by (layer, position set). Cost: ``sum_l (n_layers - l) / n_layers`` forwards of
    ``n_sets x batch`` rows plus one cached forward per run.

    ``values[layer, set]`` is the normalised metric (0 = corrupted, 1 = clean), ``logit_diff`` the
    per-context LD; ``effect`` is the change from the receiver run (signed, + towards clean).
    """

    direction: str
    sets: tuple[str, ...]
    values: Float[Tensor, "layer set"]
    logit_diff: Float[Tensor, "layer set batch"]
    clean_ld: Float[Tensor, "batch"]
    corrupted_ld: Float[Tensor, "batch"]
    seconds: float = 0.0
    items: Int[Tensor, "batch example"] | None = None  # each context's task rows: widens the intervals

    @property
    def effect(self) -> Float[Tensor, "layer set"]:
        return self.values - (0.0 if self.direction == "denoise" else 1.0)

    def table(self) -> pd.DataFrame:
        """One row per (layer, set): value, effect, mean LD, and the value's context-bootstrap interval."""
        df = cell_table(
            "resid_set",
            self.direction,
            ("layer", "set_index"),
            value=self.values,
            effect=self.effect,
            mean_logit_diff=self.logit_diff.mean(-1),
        )
        df.insert(3, "positions", [self.sets[i] for i in df["set_index"]])
        low, high = value_interval(self)
        df["ci_low"], df["ci_high"] = low.reshape(-1), high.reshape(-1)
        return df.drop(columns="set_index")


@torch.no_grad()
def patch_position_sets(
    patcher: Patcher, direction: str = "denoise", sets: Sequence[str] = POSITION_SETS, progress: bool = False
) -> PositionSetResult:
    """Patch ``hook_resid_pre`` of each layer at every position of each set at once (one batched forward per layer)."""
    t0 = time.perf_counter()
    recv, donor = runs_for(direction)
    model, pair, L, w = patcher.model, patcher.pair, patcher.n_layers, patcher.width
    names = [act_name("resid_pre", l) for l in range(L)]
    d_store, r_store = patcher.cached(donor, names), patcher.cached(recv, names)
    masks = torch.stack([position_mask(pair, s, w) for s in sets])  # [set, batch, pos]
    n, b = len(sets), pair.n_contexts
    tokens = pair.run(recv).tokens[:, :w].repeat(n, 1)
    ld = torch.empty(L, n, b)
    for l in tqdm(range(L), desc="patch resid sets", unit="layer", disable=not progress, leave=False):
        d, r = d_store[names[l]], r_store[names[l]]  # [batch, pos, d_model]
        patched = torch.where(masks.to(d.device)[..., None], d[None], r[None]).reshape(n * b, w, -1)

        def hook(act: Tensor, hook: Any, patched: Tensor = patched) -> Tensor:
            return patched.to(act.dtype)

        start = (l, r.repeat(n, 1, 1)) if l > 0 else None
        ld[l] = readout_ld(model, pair, run_to_final(model, tokens, [(names[l], hook)], start=start))
        patcher.forwards += n * (L - l) / L
    clean, corr = patcher.baseline("clean"), patcher.baseline("corrupted")
    return PositionSetResult(
        direction,
        tuple(sets),
        normalise(ld, clean, corr),
        ld,
        clean,
        corr,
        time.perf_counter() - t0,
        pair.clean.example_ids,
    )


def value_interval(
    result: Any, level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Context-bootstrap interval of a patching result's normalised value, per cell (``[n0, n1]`` arrays).

    The value is a ratio of means over contexts, ``mean_c(LD_c - base_c) / mean_c(clean_c - corrupted_c)``
    (``base``: the receiver run's LD, paired per context), so the interval resamples contexts and
    recomputes numerator and denominator together (``resampling.ratio_ci``, the findings' convention).
    A cell that is exact in every context (patching everything) has a zero-width interval at 1; a
    t-interval of per-context values normalised by the mean gap would charge it the gap's variance.
    Works for ``PatchResult`` and ``PositionSetResult`` (both keep ``logit_diff[n0, n1, batch]``). With the
    result's ``items`` (each context's task rows, ``PromptBatch.example_ids``; None leaves it as is): contexts that
    share rows are not independent, so the interval is widened by the shared-row design effect
    (``stats.widen_for_shared_rows``).
    """
    base = result.corrupted_ld if result.direction == "denoise" else result.clean_ld
    num = (result.logit_diff - base).numpy()  # [n0, n1, batch]
    gap = (result.clean_ld - result.corrupted_ld).numpy()
    _, lo, hi = ratio_ci(num, gap, n_boot=n_boot, level=level, seed=seed, items=result.items)
    offset = 0.0 if result.direction == "denoise" else 1.0
    return lo + offset, hi + offset


def _kv_group(model: Any) -> int:
    """Query heads per KV head (1 without grouped-query attention)."""
    h = int(model.cfg.n_heads)
    return h // int(getattr(model.cfg, "n_key_value_heads", None) or h)


def recomputed_z(
    pattern: Float[Tensor, "batch head q k"], v: Float[Tensor, "batch k kv_head d_head"], group: int
) -> Float[Tensor, "batch q head d_head"]:
    """``z = pattern @ v`` per query head, query head ``h`` reading KV head ``h // group`` (HF/TL's GQA order)."""
    return torch.einsum("bhqk,bkhd->bqhd", pattern, v.repeat_interleave(group, dim=2))


def _part_z(patcher: Patcher, layer: int, part: str, direction: str) -> Float[Tensor, "batch q head d_head"]:
    """Every head's ``z`` at ``layer`` recomputed with the donor's label-source pattern or label values."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    recv, donor = runs_for(direction)
    names = [act_name("pattern", layer), act_name("v", layer)]
    r, d = patcher.cached(recv, names), patcher.cached(donor, names)
    lab = position_mask(patcher.pair, "label", patcher.width).to(r[names[0]].device)  # [batch, pos]
    if part == "pattern":  # donor attention onto label sources (columns), every destination
        pat = torch.where(lab[:, None, None, :], d[names[0]], r[names[0]])
        v = r[names[1]]
    else:
        pat = r[names[0]]
        v = torch.where(lab[:, :, None, None], d[names[1]], r[names[1]])
    return recomputed_z(pat, v, _kv_group(patcher.model))


def _run_z_patches(
    patcher: Patcher, layer: int, recv: str, new_z: Tensor, head_sets: Sequence[Sequence[int]]
) -> Tensor:
    """Per-context LD ``[n_sets, batch]`` with the heads of each set taking ``new_z`` at ``layer`` (one forward)."""
    pair, L, n, b = patcher.pair, patcher.n_layers, len(head_sets), patcher.pair.n_contexts
    z_name = act_name("z", layer)

    def hook(act: Tensor, hook: Any) -> Tensor:
        a = act.reshape(n, b, *act.shape[1:]).clone()
        for j, hs in enumerate(head_sets):
            for h in hs:
                a[j, :, :, h] = new_z[:, :, h].to(a.dtype)
        return a.reshape(act.shape)

    start = (
        (layer, patcher.cached(recv, [act_name("resid_pre", layer)])[act_name("resid_pre", layer)].repeat(n, 1, 1))
        if layer > 0
        else None
    )
    tokens = pair.run(recv).tokens[:, : patcher.width].repeat(n, 1)
    resid = run_to_final(patcher.model, tokens, [(z_name, hook)], start=start)
    patcher.forwards += n * (L - layer) / L
    return readout_ld(patcher.model, pair, resid)


@torch.no_grad()
def patch_head_parts(
    patcher: Patcher, parts: Sequence[str] = PARTS, direction: str = "denoise", progress: bool = False
) -> list[PatchResult]:
    """Every head, one at a time: ``z`` recomputed with the donor's label ``pattern`` or label ``value``s; one result
    per part of ``parts``.

    Each a ``PatchResult`` of kind ``head_{part}_label_z`` on axes (layer, head). Cost: per layer and part one
    forward of ``n_heads x batch`` rows from that layer, plus one cached forward per run and layer (its pattern and
    ``v``). Memory: one layer's patterns at a time: a layer's are dropped from the patcher's cache once every part
    has used them (smollm2-135m's `circuit` kept all 30 layers' and passed 3 GB, issue 31), unless it held them before.
    """
    if isinstance(parts, str) or not set(parts) <= set(PARTS):
        raise ValueError(f"parts must be a sequence of {PARTS}, got {parts!r}")
    t0, f0 = time.perf_counter(), patcher.forwards
    recv, _ = runs_for(direction)
    L, H = patcher.n_layers, int(patcher.model.cfg.n_heads)
    ld = {p: torch.empty(L, H, patcher.pair.n_contexts) for p in parts}
    for l in tqdm(range(L), desc="patch head parts", unit="layer", disable=not progress, leave=False):
        with patcher.transient([act_name("pattern", l), act_name("v", l)]):  # both parts read them, then dropped
            for p in parts:
                ld[p][l] = _run_z_patches(patcher, l, recv, _part_z(patcher, l, p, direction), [[h] for h in range(H)])
    clean, corr = patcher.baseline("clean"), patcher.baseline("corrupted")
    # the parts cost the same (one forward per layer each; the cached runs shared): time and forwards split evenly
    seconds, forwards = (time.perf_counter() - t0) / len(parts), (patcher.forwards - f0) / len(parts)
    return [
        PatchResult(
            kind=f"head_{p}_label_z",
            direction=direction,
            axes=("layer", "head"),
            values=normalise(ld[p], clean, corr),
            logit_diff=ld[p],
            clean_ld=clean,
            corrupted_ld=corr,
            forwards=forwards,
            seconds=seconds,
            computed=torch.ones(L, H, dtype=torch.bool),
            description=f"one head's z recomputed with the donor's label {p}s",
            items=patcher.pair.clean.example_ids,
        )
        for p in parts
    ]


@torch.no_grad()
def patch_heads_part(patcher: Patcher, heads: Sequence[Head], part: str, direction: str = "denoise") -> float:
    """Normalised metric with the ``part`` patch applied to all ``heads`` (of one layer) at once.

    E.g. the ``value`` patch of every query head of one KV group equals patching that KV head's
    ``hook_v`` at the label positions (tested). Cost: one forward from that layer.
    """
    layers = {int(l) for l, _ in heads}
    if len(layers) != 1:
        raise ValueError(f"patch_heads_part takes heads of one layer, got layers {sorted(layers)}")
    (l,) = layers
    recv, _ = runs_for(direction)
    ld = _run_z_patches(patcher, l, recv, _part_z(patcher, l, part, direction), [[int(h) for _, h in heads]])[0]
    return float(normalise(ld, patcher.baseline("clean"), patcher.baseline("corrupted")))
