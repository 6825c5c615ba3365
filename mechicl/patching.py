"""Exact activation patching between correct-label and flipped-label contexts, fast.

A *pair* is one set of contexts rendered twice: the **clean** run shows the
correct labels, the **corrupted** run shows flipped labels (or only its last
``m`` demonstration labels flipped). Inputs, query and every token position are
identical; only label tokens differ (``check_pair`` asserts it).

**Metric.** At the query readout slot (``readout_pos[:, -1]``, the position
that predicts the last example's label) the logit difference
``LD = logit(answer) - logit(foil)``, where ``answer`` is the label the clean
context supports (the true label) and ``foil`` the one the corrupted context
supports. Its batch mean is normalised so that 0 is the corrupted run and 1 the
clean run::

    effect = (mean LD_patched - mean LD_corrupted) / (mean LD_clean - mean LD_corrupted)

Two directions, both on that same scale:
  ``denoise``  clean activations patched into the corrupted run (0 = no effect, 1 = fully restored);
  ``noise``    corrupted activations patched into the clean run (1 = no effect, 0 = fully destroyed).

**Sweeps** (``KINDS``): residual stream, attention and MLP outputs by
(layer, position); head outputs (``hook_z``) over all positions, at label
positions, at the query readout slot; head values and attention patterns at
label positions. Results are ``PatchResult`` (labelled axes + tidy table).

**Why it is fast and still exact** (equal to ``transformer_lens.patching`` to 1e-4; tested):

* *Upstream layers are skipped.* A patch at layer ``l`` cannot change blocks
  ``0..l-1``. The bridge's own ``start_at_layer`` re-enters at block ``l`` but
  (documented, and measured in ``benchmarks/bench_patching.py``) still executes
  blocks ``0..l-1`` and throws their output away. Here blocks ``0..l-1`` are
  replaced for the duration of the call by a function that returns the cached
  residual ``resid_pre[l]`` (see ``_start_at``), so they cost nothing.
* *Only the readout is computed.* The run stops at ``ln_final.hook_in`` and the
  final norm + unembedding is applied to the query slot and the label tokens
  only (Gemma-3's 262k-word unembedding is ~70% of a forward). Tokens after the
  query slot are dropped (causality makes that exact).
* *Patches are batched.* All cells of one layer (every head, or a chunk of
  positions) run in one forward with the receiver batch repeated along the batch
  dimension.
* *Only the hooks a sweep needs are cached*, once per run, and shared between sweeps.
* *No-op cells are not run.* A (layer, position) cell where donor and receiver
  activations are bit-identical (every position before the first differing label)
  gets the receiver's own metric without a forward.
* *Readout-slot interventions re-run one token.* ``ReadoutStepper`` caches the
  keys/values of every position before the query slot once and then re-runs only
  the query token per intervention (used by the readout-slot head sweep, head
  ablation and the function-vector effect). It checks itself against the full
  forward on construction and falls back to full forwards when it cannot be exact.

Cost of one layer-sweep: ``sum_l n_cells(l) * (n_layers - l) / n_layers`` receiver
forwards (reported as ``PatchResult.forwards``) plus one cached forward per run,
against ``n_cells`` full forwards with full-vocabulary logits for TransformerLens.
Memory: the cached activations (``n_layers x batch x pos x d_model`` floats for
the residual stream) plus one forward of ``max_rows`` rows.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.prompts import ROLE_NAMES, PromptBatch, PromptError, build_prompt_batch
from mechicl.readout import unembed_labels
from mechicl.tasks import Task, Template

DIRECTIONS = ("denoise", "noise")


class PairError(PromptError):
    """A clean/corrupted pair whose runs differ in more than their label tokens."""


# ------------------------------------------------------------------ pairs ---


@dataclass(frozen=True)
class PatchPair:
    """Clean (correct labels) and corrupted (flipped labels) renderings of the same contexts.

    ``answer`` is the class the clean context supports at the query (its shown label),
    ``foil`` the class the corrupted context supports; the metric is
    ``logit(answer) - logit(foil)`` at ``query_pos``. Build with ``make_pair`` or
    ``pair_from_batches`` (both validate). Memory: two PromptBatches.
    """

    clean: PromptBatch
    corrupted: PromptBatch
    answer: Int[Tensor, "batch"]
    foil: Int[Tensor, "batch"]
    description: str = ""

    @property
    def n_contexts(self) -> int:
        return self.clean.n_contexts

    @property
    def query_pos(self) -> Int[Tensor, "batch"]:
        return self.clean.readout_pos[:, -1]

    @property
    def answer_ids(self) -> Int[Tensor, "batch"]:
        return self.clean.label_token_ids[self.answer]

    @property
    def foil_ids(self) -> Int[Tensor, "batch"]:
        return self.clean.label_token_ids[self.foil]

    def run(self, which: str) -> PromptBatch:
        return {"clean": self.clean, "corrupted": self.corrupted}[which]

    def logit_diff(self, label_logits: Float[Tensor, "... batch n_labels"]) -> Float[Tensor, "... batch"]:
        """``logit(answer) - logit(foil)`` from label-set logits at the query slot."""
        idx = torch.stack([self.answer, self.foil], -1).expand(*label_logits.shape[:-1], 2)
        pick = label_logits.gather(-1, idx)
        return pick[..., 0] - pick[..., 1]

    def tl_metric(self, clean_ld: float, corrupted_ld: float) -> Callable[[Tensor], Tensor]:
        """The same normalised metric as a function of full logits ``[batch, pos, vocab]``.

        For ``transformer_lens.patching`` (tests and the benchmark compare against it).
        """
        rows = torch.arange(self.n_contexts)
        q, a, f = self.query_pos, self.answer_ids, self.foil_ids

        def metric(logits: Tensor) -> Tensor:
            at = logits[rows, q]
            ld = (at[rows, a] - at[rows, f]).mean()
            return (ld - corrupted_ld) / (clean_ld - corrupted_ld)

        return metric


def check_pair(clean: PromptBatch, corrupted: PromptBatch) -> None:
    """Raise ``PairError`` unless the two batches differ only in label tokens."""
    if clean.tokens.shape != corrupted.tokens.shape:
        raise PairError(
            f"clean and corrupted token tensors have different shapes {tuple(clean.tokens.shape)} vs "
            f"{tuple(corrupted.tokens.shape)}. Build both from the same example ids with build_prompt_batch."
        )
    for name in ("attention_mask", "label_pos", "readout_pos", "input_spans", "example_ids"):
        a, b = getattr(clean, name), getattr(corrupted, name)
        if a.shape != b.shape or not torch.equal(a, b):
            bad = (a != b).nonzero()[0].tolist() if a.shape == b.shape else "shape"
            what = "lengths" if name == "attention_mask" else name
            raise PairError(
                f"clean and corrupted contexts differ in {what} (first at index {bad}); a patching pair "
                f"needs the same inputs at the same positions. Build both from the same example ids, "
                f"template and tokenizer."
            )
    if not torch.equal(clean.label_token_ids, corrupted.label_token_ids):
        raise PairError(
            f"clean and corrupted runs use different label words {clean.label_words} vs {corrupted.label_words}; "
            f"the logit-difference metric needs one label vocabulary."
        )
    from mechicl.prompts import LABEL

    diff = clean.tokens != corrupted.tokens
    off_label = diff & (clean.roles != LABEL)
    if off_label.any():
        r, p = off_label.nonzero()[0].tolist()
        raise PairError(
            f"clean and corrupted contexts differ at a non-label token: context {r}, position {p} "
            f"(role {ROLE_NAMES[int(clean.roles[r, p])]}, token ids {int(clean.tokens[r, p])} vs "
            f"{int(corrupted.tokens[r, p])}). Only label tokens may differ between the two runs."
        )
    if not diff.any():
        raise PairError("clean and corrupted contexts are identical: nothing to patch")


def pair_from_batches(clean: PromptBatch, corrupted: PromptBatch, description: str = "") -> PatchPair:
    """Validate two renderings and pick the answer/foil classes at the query."""
    check_pair(clean, corrupted)
    answer = clean.shown_labels[:, -1].clone()
    n_classes = len(clean.label_words)
    other = corrupted.shown_labels[:, -1]
    foil = torch.where(other != answer, other, (answer + 1) % n_classes)
    return PatchPair(clean, corrupted, answer, foil, description or f"{clean.condition} vs {corrupted.condition}")


def make_pair(
    task: Task,
    tokenizer: Any,
    example_ids: Int[Tensor, "batch example"],
    *,
    n_ctx: int,
    prepend_bos: bool,
    last_m: int | None = None,
    template: Template | None = None,
) -> PatchPair:
    """Correct-label (clean) vs flipped-label (corrupted) renderings of ``example_ids``.

    ``last_m`` flips only the last ``m`` demonstration labels (the query's own label
    token, after the readout slot, is left as in the clean run). Cost: tokenization only.
    """
    clean = build_prompt_batch(task, tokenizer, example_ids, "default", n_ctx=n_ctx, prepend_bos=prepend_bos, template=template)
    n_ex = clean.n_examples
    if last_m is None:
        corrupted = build_prompt_batch(
            task, tokenizer, example_ids, "flipped", n_ctx=n_ctx, prepend_bos=prepend_bos, template=template
        )
        desc = "correct labels vs all labels flipped"
    else:
        if not 1 <= last_m <= n_ex - 1:
            raise PairError(f"last_m={last_m} must be between 1 and the number of demonstrations ({n_ex - 1})")
        shown = clean.true_labels.clone()
        sl = slice(n_ex - 1 - last_m, n_ex - 1)
        shown[:, sl] = (shown[:, sl] + 1) % task.n_classes
        corrupted = build_prompt_batch(
            task, tokenizer, example_ids, "flipped", n_ctx=n_ctx, prepend_bos=prepend_bos, template=template,
            shown_labels=shown,
        )
        desc = f"correct labels vs last {last_m} demonstration labels flipped"
    return pair_from_batches(clean, corrupted, desc)


def pair_for(loaded: Any, task: Task, n_contexts: int, n_examples: int, seed: int = 0, last_m: int | None = None) -> PatchPair:
    """``make_pair`` on freshly sampled contexts for a ``LoadedModel``."""
    from mechicl.prompts import sample_contexts

    ids = sample_contexts(task, n_contexts, n_examples, seed=seed)
    return make_pair(task, loaded.tokenizer, ids, n_ctx=loaded.n_ctx, prepend_bos=loaded.prepend_bos, last_m=last_m)


# ----------------------------------------------------------- forward runs ---


class _Stop(Exception):
    pass


def bridge_of(model: Any) -> Any:
    """The TransformerBridge of a ``LoadedModel`` (or the bridge itself)."""
    return getattr(model, "model", model) if not hasattr(model, "blocks") else model


_TUPLE_OUT: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _blocks_return_tuple(model: Any) -> bool:
    """Whether the model's block loop expects tuples from its blocks (probed once, 2 tokens)."""
    if model in _TUPLE_OUT:
        return _TUPLE_OUT[model]
    seen: dict[str, bool] = {}

    def probe(_m: Any, _a: Any, out: Any) -> None:
        seen["tuple"] = isinstance(out, tuple)
        raise _Stop

    h = model.blocks[0].register_forward_hook(probe)
    try:
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long))
    except _Stop:
        pass
    finally:
        h.remove()
    _TUPLE_OUT[model] = seen.get("tuple", False)
    return _TUPLE_OUT[model]


@contextlib.contextmanager
def _start_at(model: Any, layer: int, resid: Tensor | None) -> Iterator[None]:
    """Make blocks ``0..layer-1`` return ``resid`` (the residual entering ``layer``) without computing.

    The rest of the model's forward (embedding lookup, masks, rotary tables, blocks
    ``layer..``) runs unchanged, so hooks and architecture details stay the model's own.
    """
    if layer <= 0 or resid is None:
        yield
        return
    out = (resid,) if _blocks_return_tuple(model) else resid

    def skip(*args: Any, **kwargs: Any) -> Any:
        return out

    blocks = list(model.blocks)[:layer]
    for blk in blocks:  # object.__setattr__: bridge components forward setattr to the wrapped module
        object.__setattr__(blk, "forward", skip)
    try:
        yield
    finally:
        for blk in blocks:
            blk.__dict__.pop("forward", None)


def run_to_final(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    hooks: Sequence[tuple[str, Callable]] = (),
    *,
    save: Sequence[str] = (),
    store: dict[str, Tensor] | None = None,
    start: tuple[int, Tensor] | None = None,
    **forward_kwargs: Any,
) -> Float[Tensor, "batch pos d_model"]:
    """Residual entering the final norm, with ``hooks`` applied and the outputs of hooks ``save`` kept in ``store``.

    ``start=(l, resid)`` skips blocks ``0..l-1`` (see ``_start_at``). Cost: blocks ``l..`` only,
    no unembedding. Cached tensors are clones (safe against later in-place edits).
    """
    out: dict[str, Tensor] = {}
    store = store if store is not None else {}

    def grab(x: Tensor, hook: Any) -> Tensor:
        out["resid"] = x
        raise _Stop

    def saver(name: str) -> Callable:
        def save(x: Tensor, hook: Any) -> None:
            store[name] = x.detach().clone()

        return save

    fwd = [*hooks, *((n, saver(n)) for n in save), ("ln_final.hook_in", grab)]
    ctx = _start_at(model, *start) if start is not None else contextlib.nullcontext()
    with ctx:
        try:
            model.run_with_hooks(tokens, fwd_hooks=fwd, **forward_kwargs)
        except _Stop:
            pass
    if "resid" not in out:
        raise RuntimeError("the model has no ln_final.hook_in hook; mechicl needs a final-norm hook")
    return out["resid"]


def _act_name(kind: str, layer: int) -> str:
    return {
        "resid_pre": f"blocks.{layer}.hook_resid_pre",
        "attn_out": f"blocks.{layer}.hook_attn_out",
        "mlp_out": f"blocks.{layer}.hook_mlp_out",
        "z": f"blocks.{layer}.attn.hook_z",
        "v": f"blocks.{layer}.attn.hook_v",
        "pattern": f"blocks.{layer}.attn.hook_pattern",
    }[kind]


# ------------------------------------------------------------- sweep kinds ---


@dataclass(frozen=True)
class SweepKind:
    """One patching granularity: the hook it patches and how one cell is written."""

    name: str
    act: str  # key for _act_name
    axes: tuple[str, str]  # ("layer", "pos") / ("layer", "head") / ("layer", "kv_head")
    description: str
    readout_only: bool = False


KINDS: dict[str, SweepKind] = {
    k.name: k
    for k in (
        SweepKind("resid", "resid_pre", ("layer", "pos"), "residual stream entering each block, by position"),
        SweepKind("attn_out", "attn_out", ("layer", "pos"), "attention-layer output, by position"),
        SweepKind("mlp_out", "mlp_out", ("layer", "pos"), "MLP output, by position"),
        SweepKind("head_out", "z", ("layer", "head"), "head output (hook_z) at every position"),
        SweepKind("head_out_label", "z", ("layer", "head"), "head output at the in-context label positions"),
        SweepKind("head_out_readout", "z", ("layer", "head"), "head output at the query readout slot only", True),
        SweepKind("head_v_label", "v", ("layer", "kv_head"), "head values at the in-context label positions"),
        SweepKind("head_pattern_label", "pattern", ("layer", "head"), "attention paid to the label positions (every destination)"),
    )
}


def _n_index(model: Any, kind: SweepKind, width: int) -> int:
    cfg = model.cfg
    if kind.axes[1] == "pos":
        return width
    if kind.axes[1] == "kv_head":
        return int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    return int(cfg.n_heads)


def _setter(kind: SweepKind, pair: PatchPair) -> Callable[[Tensor, Tensor, int], None]:
    """``set(receiver_act, donor_act, index)`` writes one cell in place; acts are ``[batch, ...]``."""
    rows = torch.arange(pair.n_contexts)[:, None]
    lab = pair.clean.label_pos[:, :-1]  # in-context (demonstration) label positions
    if kind.axes[1] == "pos":
        def s(a: Tensor, d: Tensor, i: int) -> None:
            a[:, i] = d[:, i]
    elif kind.name == "head_out":
        def s(a: Tensor, d: Tensor, i: int) -> None:
            a[:, :, i] = d[:, :, i]
    elif kind.name in ("head_out_label", "head_v_label"):
        def s(a: Tensor, d: Tensor, i: int) -> None:
            a[rows, lab, i] = d[rows, lab, i]
    elif kind.name == "head_pattern_label":
        def s(a: Tensor, d: Tensor, i: int) -> None:  # [batch, head, dest, src]: columns of label sources
            a[rows, i, :, lab] = d[rows, i, :, lab]
    else:
        raise ValueError(f"no full-sequence setter for {kind.name}")
    return s


# ----------------------------------------------------------------- results ---


@dataclass(frozen=True)
class PatchResult:
    """A patching sweep: normalised effects on labelled axes plus per-context logit differences.

    ``values[layer, idx]`` is the normalised metric of the patched run (0 = corrupted,
    1 = clean); ``logit_diff[layer, idx, batch]`` the raw per-context LD.
    ``forwards`` counts receiver-forward equivalents spent (cached runs included).
    """

    kind: str
    direction: str
    axes: tuple[str, str]
    values: Float[Tensor, "layer idx"]
    logit_diff: Float[Tensor, "layer idx batch"]
    clean_ld: Float[Tensor, "batch"]
    corrupted_ld: Float[Tensor, "batch"]
    forwards: float = 0.0
    seconds: float = 0.0
    computed: Bool[Tensor, "layer idx"] | None = None  # cells actually run (others are no-ops / not requested)
    pos_roles: tuple[str, ...] = ()  # role of each position (for pos axes), "mixed" where contexts differ
    description: str = ""

    @property
    def effect(self) -> Float[Tensor, "layer idx"]:
        """Change caused by the patch on the normalised scale (signed: + towards the clean run)."""
        return self.values - (0.0 if self.direction == "denoise" else 1.0)

    def table(self) -> pd.DataFrame:
        """One row per cell: axes, normalised value, effect, mean LD, whether it was computed."""
        n0, n1 = self.values.shape
        df = pd.DataFrame(
            {
                "kind": self.kind,
                "direction": self.direction,
                self.axes[0]: np.repeat(np.arange(n0), n1),
                self.axes[1]: np.tile(np.arange(n1), n0),
                "value": self.values.reshape(-1).numpy(),
                "effect": self.effect.reshape(-1).numpy(),
                "mean_logit_diff": self.logit_diff.mean(-1).reshape(-1).numpy(),
            }
        )
        if self.pos_roles:
            df["role"] = [self.pos_roles[p] for p in df[self.axes[1]]]
        if self.computed is not None:
            df["computed"] = self.computed.reshape(-1).numpy()
        return df


def normalise(ld: Tensor, clean_ld: Tensor, corrupted_ld: Tensor) -> Tensor:
    """Batch-mean LD on the 0 = corrupted, 1 = clean scale (last axis is the batch)."""
    c, k = clean_ld.mean(), corrupted_ld.mean()
    if abs(float(c - k)) < 1e-6:
        raise PairError(
            f"the clean and corrupted runs give the same mean logit difference ({float(c):.4g}); "
            f"there is no effect to recover. Use more in-context examples or another task."
        )
    return (ld.mean(-1) - k) / (c - k)


# ---------------------------------------------------------------- patcher ---


class Patcher:
    """Exact activation patching for one ``PatchPair`` (see the module docstring for the speed-ups).

    ``Patcher(model, pair).sweep("head_out", "denoise")`` -> ``PatchResult``.
    Activations of each run are cached on demand (one forward per run per new set of
    hooks) and shared between sweeps. ``max_rows`` caps the rows of one batched
    forward (memory: ``max_rows x pos`` residual streams and MLP activations).
    """

    def __init__(self, model: Any, pair: PatchPair, *, max_rows: int = 64, progress: bool = False) -> None:
        self.model = bridge_of(model)
        self.pair = pair
        self.max_rows = max_rows
        self.progress = progress
        self.n_layers = int(self.model.cfg.n_layers)
        self.width = int(pair.query_pos.max()) + 1  # positions after the query slot cannot matter
        self._store: dict[str, dict[str, Tensor]] = {"clean": {}, "corrupted": {}}
        self._ld: dict[str, Tensor] = {}
        self.forwards = 0.0  # receiver-forward equivalents spent so far
        self._steppers: dict[str, ReadoutStepper] = {}

    # -- cached runs --
    def _tokens(self, which: str) -> Tensor:
        return self.pair.run(which).tokens[:, : self.width]

    def _label_ld(self, resid: Tensor) -> Tensor:
        rows = torch.arange(resid.shape[0])
        q = self.pair.query_pos.repeat(resid.shape[0] // self.pair.n_contexts)
        logits = unembed_labels(self.model, resid[rows, q], self.pair.clean.label_token_ids)
        n = resid.shape[0] // self.pair.n_contexts
        return self.pair.logit_diff(logits.view(n, self.pair.n_contexts, -1))

    @torch.no_grad()
    def cached(self, which: str, names: Sequence[str]) -> dict[str, Tensor]:
        """Activations ``names`` of run ``which`` (one forward for whatever is not cached yet)."""
        store = self._store[which]
        missing = [n for n in dict.fromkeys(names) if n not in store]
        if missing or which not in self._ld:
            resid = run_to_final(self.model, self._tokens(which), save=missing, store=store)
            self._ld[which] = self._label_ld(resid)[0]
            self.forwards += 1
        return store

    def baseline(self, which: str) -> Float[Tensor, "batch"]:
        """Per-context LD of the unpatched run ``which`` (clean or corrupted)."""
        if which not in self._ld:
            self.cached(which, [])
        return self._ld[which]

    # -- sweeps --
    def sweep(
        self,
        kind: str,
        direction: str = "denoise",
        cells: Sequence[tuple[int, int]] | None = None,
    ) -> PatchResult:
        """Patch every cell of ``kind`` (or just ``cells`` = [(layer, idx)]) in ``direction``.

        Cells not run (not requested, or provably no-ops) hold the receiver's own metric;
        ``PatchResult.computed`` marks which were run.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown sweep kind {kind!r}; use one of {', '.join(KINDS)}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        spec = KINDS[kind]
        t0, f0 = time.perf_counter(), self.forwards
        recv, donor = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
        b, L = self.pair.n_contexts, self.n_layers
        n_idx = _n_index(self.model, spec, self.width)
        clean_ld, corr_ld = self.baseline("clean"), self.baseline("corrupted")
        base = self.baseline(recv)
        ld = base.expand(L, n_idx, b).clone()
        computed = torch.zeros(L, n_idx, dtype=torch.bool)
        wanted = torch.zeros(L, n_idx, dtype=torch.bool)
        if cells is None:
            wanted[:] = True
        else:
            for l, i in cells:
                wanted[l, i] = True

        if spec.readout_only:
            self._sweep_readout(spec, recv, donor, wanted, ld, computed)
        else:
            self._sweep_full(spec, recv, donor, wanted, ld, computed)

        roles: tuple[str, ...] = ()
        if spec.axes[1] == "pos":
            r = self.pair.clean.roles[:, : self.width]
            roles = tuple(ROLE_NAMES[int(r[0, p])] if bool((r[:, p] == r[0, p]).all()) else "mixed" for p in range(self.width))
        return PatchResult(
            kind=kind,
            direction=direction,
            axes=spec.axes,
            values=normalise(ld, clean_ld, corr_ld),
            logit_diff=ld,
            clean_ld=clean_ld,
            corrupted_ld=corr_ld,
            forwards=self.forwards - f0,
            seconds=time.perf_counter() - t0,
            computed=computed,
            pos_roles=roles,
            description=spec.description,
        )

    @torch.no_grad()
    def _sweep_full(self, spec: SweepKind, recv: str, donor: str, wanted: Tensor, ld: Tensor, computed: Tensor) -> None:
        b, L, W = self.pair.n_contexts, self.n_layers, self.width
        layers = [l for l in range(L) if wanted[l].any()]
        names = [_act_name(spec.act, l) for l in layers]
        d_store = self.cached(donor, names)
        pos_kind = spec.axes[1] == "pos"  # receiver activations are needed only to find no-op cells
        r_store = self.cached(recv, (names if pos_kind else []) + [_act_name("resid_pre", l) for l in layers if l > 0])
        setter = _setter(spec, self.pair)
        per = max(1, self.max_rows // b)
        tokens = self._tokens(recv)
        for l in tqdm(layers, desc=f"patch {spec.name}", unit="layer", disable=not self.progress, leave=False):
            name = _act_name(spec.act, l)
            d_act = d_store[name]
            idx = [int(i) for i in wanted[l].nonzero()[:, 0]]
            if pos_kind:  # a position where donor == receiver is a no-op patch
                idx = [i for i in idx if not torch.equal(d_act[:, i], r_store[name][:, i])]
            for c0 in range(0, len(idx), per):
                chunk = idx[c0 : c0 + per]
                n = len(chunk)

                def hook(act: Tensor, hook: Any, chunk: list[int] = chunk, n: int = n, d_act: Tensor = d_act) -> Tensor:
                    a = act.reshape(n, b, *act.shape[1:]).clone()
                    for j, i in enumerate(chunk):
                        setter(a[j], d_act, i)
                    return a.reshape(act.shape)

                start = (l, r_store[_act_name("resid_pre", l)].repeat(n, 1, 1)) if l > 0 else None
                resid = run_to_final(self.model, tokens.repeat(n, 1), [(name, hook)], start=start)
                ld[l, chunk] = self._label_ld(resid)
                computed[l, chunk] = True
                self.forwards += n * (L - l) / L

    @torch.no_grad()
    def patch_heads(self, heads: Sequence[tuple[int, int]], direction: str = "denoise", where: str = "all") -> float:
        """Normalised metric with the outputs of all ``heads`` patched at once.

        ``where``: ``all`` positions, in-context ``label`` positions, or the query ``readout`` slot.
        Patching every head recovers the other run exactly (at the readout slot the
        residual stream is embedding + head outputs + MLPs of that position only).
        Cost: one forward from the lowest patched layer (``readout``: one token per context).
        """
        if where not in ("all", "label", "readout"):
            raise ValueError(f"where must be all, label or readout, got {where!r}")
        recv, donor = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
        clean_ld, corr_ld = self.baseline("clean"), self.baseline("corrupted")
        heads = sorted(set((int(l), int(h)) for l, h in heads))
        if not heads:
            ld = self.baseline(recv)
        elif where == "readout":
            st = self.stepper(recv)
            masks = torch.zeros(1, self.n_layers, int(self.model.cfg.n_heads), dtype=torch.bool)
            for l, h in heads:
                masks[0, l, h] = True
            ld = self.pair.logit_diff(st.run(masks, self.stepper(donor).z))[0]
        else:
            layers = sorted({l for l, _ in heads})
            names = [_act_name("z", l) for l in layers]
            d_store = self.cached(donor, names)
            r_store = self.cached(recv, [_act_name("resid_pre", layers[0])] if layers[0] > 0 else [])
            setter = _setter(KINDS["head_out" if where == "all" else "head_out_label"], self.pair)
            hooks = []
            for l in layers:
                def hook(act: Tensor, hook: Any, l: int = l) -> Tensor:
                    a = act.clone()
                    for ll, h in heads:
                        if ll == l:
                            setter(a, d_store[_act_name("z", l)], h)
                    return a
                hooks.append((_act_name("z", l), hook))
            l0 = layers[0]
            start = (l0, r_store[_act_name("resid_pre", l0)]) if l0 > 0 else None
            ld = self._label_ld(run_to_final(self.model, self._tokens(recv), hooks, start=start))[0]
            self.forwards += (self.n_layers - l0) / self.n_layers
        return float(normalise(ld, clean_ld, corr_ld))

    def stepper(self, which: str) -> "ReadoutStepper":
        """A ``ReadoutStepper`` on run ``which`` (built once)."""
        if which not in self._steppers:
            self._steppers[which] = ReadoutStepper(self.model, self.pair.run(which), max_rows=max(self.max_rows, 256))
            self.forwards += 1
        return self._steppers[which]

    @torch.no_grad()
    def _sweep_readout(self, spec: SweepKind, recv: str, donor: str, wanted: Tensor, ld: Tensor, computed: Tensor) -> None:
        L = self.n_layers
        cells = wanted.nonzero().tolist()
        donor_z = self.stepper(donor).z  # [batch, layer, head, d_head] at the query slot
        st = self.stepper(recv)
        masks = torch.zeros(len(cells), L, wanted.shape[1], dtype=torch.bool)
        for j, (l, h) in enumerate(cells):
            masks[j, l, h] = True
        logits = st.run(masks, donor_z)  # [cells, batch, n_labels]
        out = self.pair.logit_diff(logits)
        for j, (l, h) in enumerate(cells):
            ld[l, h] = out[j]
            computed[l, h] = True
        self.forwards += st.last_cost


def patch(model: Any, pair: PatchPair, kind: str, direction: str = "denoise", **kw: Any) -> PatchResult:
    """One sweep with a fresh ``Patcher`` (use a ``Patcher`` to share caches between sweeps)."""
    return Patcher(model, pair, **kw).sweep(kind, direction)


# ----------------------------------------------------------- readout stepper ---


def _cache_shim(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """transformers 5 passes the KV cache as ``cache=``; TL 4.3's attention bridge reads ``past_key_values``."""
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
    return args, kwargs


def _fresh_cache(cache: Any, repeats: int) -> Any:
    """A copy of a prefix KV cache whose updates do not touch the original, batch-repeated."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    if repeats > 1:
        new.batch_repeat_interleave(repeats)
    return new


class ReadoutStepper:
    """Re-run only the query readout slot of every context, with head-output interventions there.

    An intervention replaces head outputs (``hook_z``) at the query slot and nowhere
    else, so every earlier position -- and its keys and values -- is unchanged. On
    construction the prefix (every position before the query slot, left-aligned)
    runs once and its key/value cache is kept. ``run`` then appends ``n`` copies of
    each context's query token, all at the query's position, with a 4D attention
    mask that lets copy ``i`` see the cached prefix and itself only: ``n``
    independent re-runs of one token in one call, sharing one cache (no copies per
    intervention). Construction checks the re-run against the full forward and falls
    back to full forwards (``mode == "full"``) if the model has no usable KV cache
    (e.g. TL-native models, prompts longer than a sliding window) or the check fails.

    Cost: construction 1 forward; ``run`` of ``n`` interventions: ``n`` tokens per
    context (``mode == "kv"``, ``step_tokens`` tokens per call) or ``n`` forwards from
    the lowest intervened layer (``"full"``, ``max_rows`` rows per call), reported in
    ``last_cost`` (forward equivalents). Memory (kv): the prefix cache,
    ``batch x pos x n_layers x 2 x n_kv_heads x d_head`` floats, plus one step.
    """

    def __init__(self, model: Any, batch: PromptBatch, *, max_rows: int = 256, step_tokens: int = 4096, mode: str = "auto",
                 atol: float = 1e-3) -> None:
        self.model = bridge_of(model)
        self.batch = batch
        self.max_rows, self.step_tokens = max_rows, step_tokens
        hf_cfg = getattr(getattr(self.model, "original_model", None), "config", None)
        self._window = int(getattr(hf_cfg, "sliding_window", 0) or 0)
        self.q = batch.readout_pos[:, -1]
        self.n_layers, self.n_heads = int(self.model.cfg.n_layers), int(self.model.cfg.n_heads)
        self.label_ids = batch.label_token_ids
        self.last_cost = 0.0
        self.mode = "full"
        self._kv_cache = None
        z_names = [_act_name("z", l) for l in range(self.n_layers)]
        b, P = batch.n_contexts, int(self.q.max()) + 1
        # left-aligned prefix: row r holds tokens[r, :q_r + 1] at the right end
        tok = torch.zeros(b, P, dtype=torch.long)
        mask = torch.zeros(b, P, dtype=torch.long)
        pos = torch.zeros(b, P, dtype=torch.long)
        for r in range(b):
            n = int(self.q[r]) + 1
            tok[r, P - n :] = batch.tokens[r, :n]
            mask[r, P - n :] = 1
            pos[r, P - n :] = torch.arange(n)
        self._prefix = (tok, mask, pos)
        cache = self._new_cache() if mode in ("auto", "kv") else None
        store: dict[str, Tensor] = {}
        with torch.no_grad():
            if cache is not None:
                try:
                    with self._shim():
                        resid = run_to_final(
                            self.model, tok, save=z_names, store=store, attention_mask=mask, position_ids=pos,
                            **self._cache_kwargs(cache),
                        )
                    if cache.get_seq_length() != P:
                        raise RuntimeError(f"KV cache holds {cache.get_seq_length()} positions, expected {P}")
                    cache.crop(-1)  # drop the query token: steps re-run it
                    self._kv_cache = cache
                except Exception as e:  # noqa: BLE001 - any failure means: use full forwards
                    if mode == "kv":
                        raise
                    warnings.warn(f"ReadoutStepper: KV-cache path unavailable ({type(e).__name__}: {e}); using full forwards")
                    cache, store = None, {}
            if cache is None:
                full = batch.tokens[:, :P]
                res_names = [_act_name("resid_pre", l) for l in range(1, self.n_layers)]
                resid = run_to_final(self.model, full, save=z_names + res_names, store=store)
                self._resid_pre = {l: store[_act_name("resid_pre", l)] for l in range(1, self.n_layers)}
                rows = torch.arange(b)
                self.z = torch.stack([store[n][rows, self.q] for n in z_names], 1)
                self.base_logits = unembed_labels(self.model, resid[rows, self.q], self.label_ids)
            else:
                self.z = torch.stack([store[n][:, -1] for n in z_names], 1)  # [batch, layer, head, d_head]
                self.base_logits = unembed_labels(self.model, resid[:, -1], self.label_ids)
                self.mode = "kv"
                check = self.run(torch.zeros(3, self.n_layers, self.n_heads, dtype=torch.bool), None)
                err = float((check - self.base_logits).abs().max())
                if not err <= atol * max(1.0, float(self.base_logits.abs().max())):
                    if mode == "kv":
                        raise RuntimeError(f"ReadoutStepper KV path differs from the full forward by {err:.3g}")
                    warnings.warn(f"ReadoutStepper: KV re-run differs from the full forward by {err:.3g}; using full forwards")
                    self.__init__(model, batch, max_rows=max_rows, step_tokens=step_tokens, mode="full", atol=atol)  # type: ignore[misc]
                    return
        self.last_cost = 1.0

    @property
    def n_contexts(self) -> int:
        return self.batch.n_contexts

    def _new_cache(self) -> Any:
        hf = getattr(self.model, "original_model", None)
        config = getattr(hf, "config", None)
        if config is None or not hasattr(hf, "generate"):
            return None  # not a Hugging Face causal LM (e.g. TL-native): no KV cache
        try:
            from transformers import DynamicCache

            return DynamicCache(config=config)
        except Exception:  # noqa: BLE001
            return None

    def _cache_kwargs(self, cache: Any) -> dict[str, Any]:
        """transformers >= 5 names the forward's KV-cache argument ``cache``, earlier versions ``past_key_values``."""
        import inspect

        hf = self.model.original_model
        name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        return {name: cache, "use_cache": True}

    @contextlib.contextmanager
    def _shim(self) -> Iterator[None]:
        handles = [blk.attn.register_forward_pre_hook(_cache_shim, with_kwargs=True) for blk in self.model.blocks]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def run(
        self,
        masks: Bool[Tensor, "n layer head"],
        source: Float[Tensor, "... layer head d_head"] | None = None,
        progress: bool = False,
    ) -> Float[Tensor, "n batch n_labels"]:
        """Label logits at the query slot for ``n`` interventions.

        Intervention ``i`` replaces the query-slot output of every head with
        ``masks[i, layer, head]`` by ``source[..., layer, head, :]`` (``None``: zero;
        ``[layer, head, d_head]``: one vector for every context, e.g. a mean;
        ``[batch, layer, head, d_head]``: per context, e.g. a donor run's output).
        """
        n = masks.shape[0]
        b = self.n_contexts
        per = max(1, (self.step_tokens if self.mode == "kv" else self.max_rows) // b)
        if self.mode == "kv" and self._window:
            per = max(1, min(per, self._window - self._prefix[0].shape[1]))
        out = []
        self.last_cost = 0.0
        for c0 in tqdm(range(0, n, per), desc="readout interventions", unit="chunk", disable=not progress, leave=False):
            out.append(self._run_chunk(masks[c0 : c0 + per], source))
        return torch.cat(out, 0) if out else torch.zeros(0, b, len(self.label_ids))

    def _hooks(self, masks: Tensor, source: Tensor | None, n: int, rows_pos: Tensor | None) -> list[tuple[str, Callable]]:
        b = self.n_contexts
        hooks = []
        for l in range(self.n_layers):
            m_l = masks[:, l]  # [n, head]
            if not m_l.any():
                continue
            if source is None:
                src = None
            elif source.dim() == 3:
                src = source[l][None, None]  # [1, 1, head, d]
            else:
                src = source[:, l][:, None]  # [batch, 1, head, d]

            def hook(act: Tensor, hook: Any, m_l: Tensor = m_l, src: Tensor | None = src) -> Tensor:
                # rows are context-major: row = context * n + intervention
                if rows_pos is None:  # kv mode: act [b, n, head, d], intervention i in column i
                    repl = torch.zeros_like(act) if src is None else src.expand_as(act)
                    return torch.where(m_l[None, :, :, None], repl, act)
                a = act.clone()  # full mode: act [b*n, pos, head, d]; edit the query slot only
                at = a[torch.arange(b * n), rows_pos].reshape(b, n, *a.shape[2:])
                repl = torch.zeros_like(at) if src is None else src.expand_as(at)
                a[torch.arange(b * n), rows_pos] = torch.where(m_l[None, :, :, None], repl, at).reshape(b * n, *a.shape[2:])
                return a

            hooks.append((_act_name("z", l), hook))
        return hooks

    def _run_chunk(self, masks: Tensor, source: Tensor | None) -> Tensor:
        n, b, L = masks.shape[0], self.n_contexts, self.n_layers
        if self.mode == "kv":
            # n copies of each context's query token side by side, all at the query's position; a 4D mask
            # lets copy i see the cached prefix and itself only, so the copies are independent re-runs
            tok, mask, _ = self._prefix
            pm = tok.shape[1] - 1  # cached prefix length
            m4 = torch.zeros(b, 1, n, pm + n, dtype=torch.bool)
            m4[:, 0, :, :pm] = mask[:, None, :pm].bool()
            m4[:, 0, torch.arange(n), pm + torch.arange(n)] = True
            with self._shim():
                resid = run_to_final(
                    self.model, tok[:, -1:].expand(b, n).contiguous(), self._hooks(masks, source, n, None),
                    attention_mask=m4, position_ids=self.q[:, None].expand(b, n).contiguous(),
                    **self._cache_kwargs(_fresh_cache(self._kv_cache, 1)),
                )
            self.last_cost += n / max(1, int(self.q.float().mean()) + 1)
            return unembed_labels(self.model, resid, self.label_ids).transpose(0, 1)  # [n, b, labels]
        used = masks.any(0).any(-1).nonzero()[:, 0]
        l0 = int(used.min()) if len(used) else L - 1
        P = int(self.q.max()) + 1
        rows_pos = self.q.repeat_interleave(n)
        start = (l0, self._resid_pre[l0].repeat_interleave(n, 0)) if l0 > 0 else None
        resid = run_to_final(
            self.model, self.batch.tokens[:, :P].repeat_interleave(n, 0), self._hooks(masks, source, n, rows_pos), start=start
        )
        self.last_cost += n * (L - l0) / L
        logits = unembed_labels(self.model, resid[torch.arange(b * n), rows_pos], self.label_ids)
        return logits.reshape(b, n, -1).transpose(0, 1)


# ------------------------------------------------------------------- files ---


def plot_heatmap(values: Tensor, axes: tuple[str, str], path: Any, title: str = "", xticklabels: Sequence[str] | None = None, center: float | None = 0.0) -> Any:
    """A layer x (head | position) heatmap (diverging colours centred on ``center``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = values.detach().float().numpy()
    w = max(4.0, min(18.0, 0.28 * v.shape[1] + 2.5))
    h = max(3.0, min(12.0, 0.25 * v.shape[0] + 1.5))
    fig, ax = plt.subplots(figsize=(w, h), dpi=120)
    lim = float(np.nanmax(np.abs(v - (center or 0.0)))) or 1.0
    kw = dict(cmap="RdBu_r", vmin=(center or 0.0) - lim, vmax=(center or 0.0) + lim) if center is not None else dict(cmap="viridis")
    im = ax.imshow(v, aspect="auto", origin="upper", **kw)
    ax.set_ylabel(axes[0])
    ax.set_xlabel(axes[1])
    if xticklabels is not None and len(xticklabels) <= 80:
        ax.set_xticks(range(len(xticklabels)))
        ax.set_xticklabels(xticklabels, rotation=90, fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_patch_results(results: Sequence[PatchResult], out: Any, title: str = "") -> dict[str, Any]:
    """``<kind>_<direction>.csv`` and ``.png`` per result plus ``patching.csv`` (all rows) into ``out``."""
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    tables = []
    for r in results:
        stem = f"{r.kind}_{r.direction}"
        t = r.table()
        tables.append(t)
        t.to_csv(out / f"{stem}.csv", index=False)
        files[f"{stem}_csv"] = out / f"{stem}.csv"
        ticks = [f"{p}:{role[:3]}" for p, role in enumerate(r.pos_roles)] if r.pos_roles else None
        files[f"{stem}_png"] = plot_heatmap(
            r.values, r.axes, out / f"{stem}.png",
            f"{title}\n{r.kind} ({r.description}), {r.direction}; 0 = corrupted, 1 = clean",
            xticklabels=ticks, center=0.0 if r.direction == "denoise" else 1.0,
        )
    if tables:
        pd.concat(tables, ignore_index=True).to_csv(out / "patching.csv", index=False)
        files["table"] = out / "patching.csv"
    return files


__all__ = [
    "DIRECTIONS",
    "KINDS",
    "PairError",
    "PatchPair",
    "PatchResult",
    "Patcher",
    "ReadoutStepper",
    "check_pair",
    "make_pair",
    "normalise",
    "pair_for",
    "pair_from_batches",
    "patch",
    "plot_heatmap",
    "run_to_final",
    "write_patch_results",
]
