"""Path patching: the effect of a sender head's donor output through one receiver head's q, k or v input only.

Definition (Wang et al. 2023, "direct path" form), on a ``PatchPair`` in one direction (receiver
run = corrupted for ``denoise``, clean for ``noise``; donor run = the other):

1. **Sender run.** The receiver run, with the sender head's ``z`` at the sender positions (a
   ``label_patching.POSITION_SETS`` set: label tokens, inputs, readout slot or all) replaced by
   the donor's, and **every other component frozen** at the receiver run's values: all other
   heads' outputs and every MLP output (here: the sender layer's MLP and every later
   ``hook_attn_out`` / ``hook_mlp_out``). The residual stream then differs from the receiver
   run by the sender's change alone (``mlps="recomputed"`` lets the MLPs recompute instead, as
   Wang et al. do, so paths through MLPs count as the sender's); the receiver's ``hook_q`` / ``hook_k`` / ``hook_v`` inputs
   are recorded, and the final residual gives the **sender -> logits** (direct) path.
2. **Receiver run.** The receiver run again, with one input (q, k or v) of the receiver's layer
   set to the recorded one, and only the receiver head's ``z`` at the query readout slot allowed
   to change (every other head and position keeps the receiver run's ``z``); everything
   downstream of the receiver recomputes. With grouped-query attention the recorded k / v is the
   shared KV head's, but only the one query head's ``z`` takes it, so the path is one head's.

Metric: ``patching``'s LD at the query slot, normalised by the clean - corrupted gap; the effect
is ``(LD_path - LD_receiver) / (mean LD_clean - mean LD_corrupted)`` per context (signed, + =
towards clean). The reported effect is its mean, a ratio of means; its interval is a context
bootstrap that resamples numerator and gap together (``resampling.ratio_ci``). Fast: partial forwards (upstream blocks
skipped, stop at the final norm, senders of one layer batched; receivers batched over senders).
Checked against a brute-force two-run implementation with plain TL hooks in
``tests/analysis/patching/test_paths.py``.
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

from mechicl.analysis.engine.hooks import Head, act_name, capture, run_to_final
from mechicl.analysis.patching.exact import Patcher
from mechicl.analysis.patching.positions import position_mask, readout_ld, runs_for
from mechicl.analysis.stats import ratio_ci
from mechicl.data.names import head_name

INPUTS = ("q", "k", "v")
MLPS = ("frozen", "recomputed")
LOGITS = "logits"


@dataclass(frozen=True)
class PathResult:
    """Path effects of ``senders`` on ``targets`` (``(receiver head, input)`` or ``(None, "logits")``).

    ``ld[sender, target, batch]`` is the per-context LD of the path-patched run; ``effect`` the
    per-context normalised change from the receiver run. Cost: one forward per sender layer
    (``n_senders_of_layer x batch`` rows, from that layer) plus one per (receiver, input) with
    ``n_earlier_senders x batch`` rows from the receiver's layer.
    """

    direction: str
    positions: str
    senders: tuple[Head, ...]
    targets: tuple[tuple[Head | None, str], ...]
    ld: Float[Tensor, "sender target batch"]
    receiver_ld: Float[Tensor, "batch"]
    context_gap: Float[Tensor, "batch"]  # LD clean - LD corrupted, per context
    mlps: str = "frozen"
    seconds: float = 0.0
    items: Int[Tensor, "batch example"] | None = None  # each context's task rows: widens the intervals

    @property
    def gap(self) -> float:
        """Mean LD clean - mean LD corrupted: the normaliser."""
        return float(self.context_gap.mean())

    @property
    def effect(self) -> Float[Tensor, "sender target batch"]:
        return (self.ld - self.receiver_ld) / self.gap

    def table(self, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
        """One row per (sender, target) with reachable paths: the effect (a ratio of means over contexts)
        and its context-bootstrap interval (``stats.ratio_ci``: numerator and gap resampled together), widened by
        the shared-row design effect when ``items`` (the contexts' task rows) are known."""
        eff = self.effect.mean(-1).numpy()  # the ratio of means (defined for any non-zero gap)
        _, lo_all, hi_all = ratio_ci(
            (self.ld - self.receiver_ld).numpy(),
            self.context_gap.numpy(),
            n_boot=n_boot,
            level=level,
            seed=seed,
            items=self.items,
        )  # NaN where the gap is not positive
        rows = []
        for i, (sl, sh) in enumerate(self.senders):
            for j, (recv, inp) in enumerate(self.targets):
                if recv is not None and recv[0] <= sl:
                    continue  # no path from a head to one at its own layer or below
                m, lo, hi = float(eff[i, j]), float(lo_all[i, j]), float(hi_all[i, j])
                rows.append(
                    dict(
                        direction=self.direction,
                        positions=self.positions,
                        mlps=self.mlps,
                        sender=head_name(sl, sh),
                        sender_layer=sl,
                        sender_head=sh,
                        receiver=head_name(*recv) if recv else LOGITS,
                        receiver_layer=recv[0] if recv else np.nan,
                        receiver_head=recv[1] if recv else np.nan,
                        input=inp,
                        effect=m,
                        ci_low=lo,
                        ci_high=hi,
                        n_contexts=self.ld.shape[-1],
                    )
                )
        return pd.DataFrame(rows)


def _sender_runs(
    patcher: Patcher, layer: int, heads: Sequence[int], positions: str, direction: str, names: Sequence[str], mlps: str
) -> tuple[dict[str, Tensor], Tensor]:
    """Step 1 for the senders of one layer: recorded receiver inputs ``names`` and the direct-path LD ``[n, batch]``."""
    recv, donor = runs_for(direction)
    pair, L, b, n = patcher.pair, patcher.n_layers, patcher.pair.n_contexts, len(heads)
    kinds = ("attn_out", "mlp_out") if mlps == "frozen" else ("attn_out",)
    frozen = [act_name(k, l) for l in range(layer, L) for k in kinds if (l, k) != (layer, "attn_out")]
    r = patcher.cached(recv, frozen + [act_name("resid_pre", layer)])
    dz = patcher.cached(donor, [act_name("z", layer)])[act_name("z", layer)]
    where = position_mask(pair, positions, patcher.width)[:, :, None].to(dz.device)  # [batch, pos, 1]

    def send(act: Tensor, hook: Any) -> Tensor:
        a = act.reshape(n, b, *act.shape[1:]).clone()
        for j, h in enumerate(heads):
            a[j, :, :, h] = torch.where(where, dz[:, :, h], a[j, :, :, h])
        return a.reshape(act.shape)

    def freeze(name: str) -> Any:
        return lambda act, hook: r[name].repeat(n, *([1] * (act.ndim - 1))).to(act.dtype)

    store: dict[str, Tensor] = {}
    hooks = [(act_name("z", layer), send), *capture(names, store), *[(f, freeze(f)) for f in frozen]]
    start = (layer, r[act_name("resid_pre", layer)].repeat(n, 1, 1)) if layer > 0 else None
    resid = run_to_final(patcher.model, pair.run(recv).tokens[:, : patcher.width].repeat(n, 1), hooks, start=start)
    patcher.forwards += n * (L - layer) / L
    return store, readout_ld(patcher.model, pair, resid)


def _receiver_run(patcher: Patcher, receiver: Head, inp: str, recorded: Tensor, direction: str) -> Tensor:
    """Step 2: LD ``[n, batch]`` with ``inp`` of the receiver's layer set to ``recorded`` (n stacked sender runs)."""
    recv, _ = runs_for(direction)
    (l, h), pair, L, b = receiver, patcher.pair, patcher.n_layers, patcher.pair.n_contexts
    n = recorded.shape[0] // b
    r = patcher.cached(recv, [act_name("z", l), act_name("resid_pre", l)])
    rz, q = r[act_name("z", l)], pair.query_pos  # [batch, pos, head, d_head], [batch]

    def put(act: Tensor, hook: Any) -> Tensor:
        return recorded.to(act.device, act.dtype)

    def keep_one(act: Tensor, hook: Any) -> Tensor:
        a = act.reshape(n, b, *act.shape[1:])
        out = rz.repeat(n, 1, 1, 1).view_as(a).clone()
        rows, qd = torch.arange(b, device=act.device), q.to(act.device)
        out[:, rows, qd, h] = a[:, rows, qd, h]
        return out.reshape(act.shape)

    start = (l, r[act_name("resid_pre", l)].repeat(n, 1, 1)) if l > 0 else None
    hooks = [(act_name(inp, l), put), (act_name("z", l), keep_one)]
    resid = run_to_final(patcher.model, pair.run(recv).tokens[:, : patcher.width].repeat(n, 1), hooks, start=start)
    patcher.forwards += n * (L - l) / L
    return readout_ld(patcher.model, pair, resid)


@torch.no_grad()
def path_patch(
    patcher: Patcher,
    senders: Sequence[Head],
    receivers: Sequence[Head],
    positions: str = "label",
    direction: str = "denoise",
    inputs: Sequence[str] = INPUTS,
    mlps: str = "frozen",
    progress: bool = False,
) -> PathResult:
    """Sender -> receiver (each of ``inputs``) and sender -> logits path effects (see the module docstring).

    Pairs with the receiver at or below the sender's layer have no path; they keep the receiver
    run's LD (effect 0) and ``PathResult.table`` leaves them out.
    """
    bad = [i for i in inputs if i not in INPUTS]
    if bad:
        raise ValueError(f"receiver inputs must be among {INPUTS}, got {bad}")
    if mlps not in MLPS:
        raise ValueError(f"mlps must be one of {MLPS}, got {mlps!r}")
    t0 = time.perf_counter()
    recv, _ = runs_for(direction)
    senders = [(int(l), int(h)) for l, h in senders]
    receivers = [(int(l), int(h)) for l, h in receivers]
    targets = [(r, i) for r in receivers for i in inputs] + [(None, LOGITS)]
    b = patcher.pair.n_contexts
    base = patcher.baseline(recv)
    ld = base.expand(len(senders), len(targets), b).clone()
    names = sorted({act_name(i, l) for l, _ in receivers for i in inputs})
    recorded: dict[Head, dict[str, Tensor]] = {}
    for sl in tqdm(
        sorted({l for l, _ in senders}), desc="path senders", unit="layer", disable=not progress, leave=False
    ):
        group = [s for s in senders if s[0] == sl]
        later = [nm for nm in names if int(nm.split(".")[1]) > sl]
        store, direct = _sender_runs(patcher, sl, [h for _, h in group], positions, direction, later, mlps)
        for j, s in enumerate(group):
            recorded[s] = {nm: x[j * b : (j + 1) * b] for nm, x in store.items()}
            ld[senders.index(s), -1] = direct[j]
    for t, (rcv, inp) in enumerate(tqdm(targets[:-1], desc="path receivers", disable=not progress, leave=False)):
        idx = [i for i, s in enumerate(senders) if s[0] < rcv[0]]
        if idx:
            stacked = torch.cat([recorded[senders[i]][act_name(inp, rcv[0])] for i in idx])
            ld[idx, t] = _receiver_run(patcher, rcv, inp, stacked, direction)
    gap = patcher.baseline("clean") - patcher.baseline("corrupted")
    return PathResult(
        direction,
        positions,
        tuple(senders),
        tuple(targets),
        ld,
        base,
        gap,
        mlps,
        time.perf_counter() - t0,
        patcher.pair.clean.example_ids,
    )


def path_matrix(result: PathResult, inp: str) -> pd.DataFrame:
    """Sender x receiver matrix of mean effects for one input (``q``/``k``/``v``, or ``logits``: one column)."""
    df = result.table()
    df = df[df["input"] == inp]
    return df.pivot_table(index="sender", columns="receiver", values="effect", sort=False)
