"""Exact activation patching between correct-label and flipped-label contexts, fast.

A *pair* is one set of contexts rendered twice: the **clean** run shows the correct labels, the
**corrupted** run shows flipped labels (or only its last ``m`` demonstration labels flipped). Inputs,
query and every token position are identical; only label tokens differ (``check_pair`` asserts it).
Pairs are built in ``mechicl.data.pairs``; the partial forwards below (upstream skip,
stop at the final norm) are ``analysis.engine.hooks.run_to_final`` and the re-run engine (``analysis.engine.reruns``).

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

**Sweeps** (``patching.kinds.KINDS``, the one list; cells written by ``patching.cells``): residual stream, attention and MLP outputs by
(layer, position); head outputs (``hook_z``) over all positions, at label
positions, at the query readout slot; head values and attention patterns at
label positions. Results are ``PatchResult`` (labelled axes + tidy table).

**Why it is fast and still exact** (equal to ``transformer_lens.patching`` to 1e-4; tested):
upstream blocks of a patch at layer ``l`` are skipped for real (``surgery.start_at``; the bridge's
``start_at_layer`` still executes them, see ``benchmarks/bench_patching.py``); the run stops at
``ln_final.hook_in`` and only the query slot's label logits are unembedded (Gemma-3's 262k-word
unembedding is 54% of a 300-token forward in `benchmarks/bench_forward.py`), with tokens after the query slot dropped (causality); all cells
of one layer run in one batched forward; only the hooks a sweep needs are cached, once per run;
(layer, position) cells where donor and receiver are bit-identical (before the first differing
label) are not run; re-runs run only the positions a patch can change, over the cached keys and values of
the others (``prefix_reuse.SuffixRunner``; HF models, a sliding window applied in the re-runs' masks, first
re-run checked against the full forward, else full width with a warning): ``head_out`` the positions from the
first differing token ``p0`` on, over the prefix both runs share; a (layer, position) cell at ``p`` the positions
``p ..`` query slot, over the receiver's own cache of positions ``< p`` (cells of a layer share a call from their
earliest position, ``prefix_reuse.suffix_groups``); readout-slot interventions re-run one token
(``ReadoutStepper``, self-checked likewise).

Cost of one layer-sweep: ``sum_cells (n_layers - l) / n_layers * (width - s) / width`` receiver forwards
(``PatchResult.forwards``), ``s`` the position a cell's call re-runs from: 0 without a KV cache; ``p0`` for
``head_out`` (plus one prefix forward shared by both directions and one check per receiver, 1 forward together);
the call's earliest cell position for sweeps by position (plus, per receiver, its cache, ``(width - 1) / width``
of a forward, and one check, ``(width - p0) / width``); plus one cached forward per run, against ``n_cells`` full
forwards with full-vocabulary logits for TransformerLens. Memory: the cached activations (``n_layers x batch x
pos x d_model`` floats for the residual stream), the KV caches (``n_layers x 2 x batch x n_kv_heads x d_head``
floats per position: ``p0`` positions shared, ``width - 1`` per receiver swept by position) and one forward of
``max_rows`` rows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.analysis.engine.hooks import FINAL, Head, act_name, capture, head_masks, run_to_final, to_host
from mechicl.analysis.engine.prefix_reuse import SuffixRunner, shared_prefix, suffix_groups
from mechicl.analysis.engine.readout import ReadoutRun, unembed_labels
from mechicl.analysis.engine.reruns import kv_or_full
from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.analysis.patching.cells import n_index, readout_ld, setter
from mechicl.analysis.patching.kinds import KINDS, SweepKind, runs_for
from mechicl.analysis.patching.result import PatchResult, normalise
from mechicl.data.pairs import PatchPair
from mechicl.data.prompts import ROLE_NAMES
from mechicl.errors import PairError

# ---------------------------------------------------------------- patcher ---


class Patcher:
    """Exact activation patching for one ``PatchPair`` (see the module docstring for the speed-ups).

    ``Patcher(model, pair).sweep("head_out", "denoise")`` -> ``PatchResult``.
    Activations of each run are cached on demand (one forward per run per new set of
    hooks) and shared between sweeps. ``max_rows`` caps the rows of one batched
    forward (memory: ``max_rows x pos`` residual streams and MLP activations).
    """

    def __init__(
        self, model: Any, pair: PatchPair, *, max_rows: int = 64, progress: bool = False, prefix_reuse: bool = True
    ) -> None:
        self.model = model
        self.pair = pair
        self.max_rows = max_rows
        self.progress = progress
        self.prefix_reuse = prefix_reuse  # sweeps re-run only the positions a patch can change (SuffixRunner)
        self._runners: dict[tuple[str, bool], SuffixRunner] = {}  # (receiver, whole run) -> its checked runner
        self.n_layers = int(self.model.cfg.n_layers)
        self.width = int(pair.query_pos.max()) + 1  # positions after the query slot cannot matter
        self._store: dict[str, dict[str, Tensor]] = {"clean": {}, "corrupted": {}}
        self._ld: dict[str, Tensor] = {}
        self.forwards = 0.0  # receiver-forward equivalents spent so far
        self._steppers: dict[str, ReadoutStepper] = {}

    # -- cached runs --
    def _tokens(self, which: str) -> Tensor:
        return self.pair.run(which).tokens[:, : self.width]

    @torch.no_grad()
    def cached(self, which: str, names: Sequence[str]) -> dict[str, Tensor]:
        """Activations ``names`` of run ``which`` (one forward for whatever is not cached yet)."""
        store = self._store[which]
        missing = [n for n in dict.fromkeys(names) if n not in store]
        if missing or which not in self._ld:
            resid = run_to_final(self.model, self._tokens(which), capture(missing, store))
            self._ld[which] = readout_ld(self.model, self.pair, resid)[0]
            self.forwards += 1
        return store

    @contextlib.contextmanager
    def transient(self, names: Sequence[str]) -> Iterator[None]:
        """Activations ``names`` cached inside the block (either run) are dropped when it ends; those cached before
        it stay: how a layer-by-layer sweep keeps one layer's activations at a time. Cost: none."""
        held = {w: set(names) & set(s) for w, s in self._store.items()}
        try:
            yield
        finally:
            for w, s in self._store.items():
                for n in set(names) - held[w]:
                    s.pop(n, None)

    def prime(self, which: str, run: ReadoutRun) -> None:
        """Fill run ``which``'s cache from ``run``, a ``ReadoutRun`` whose first contexts are this pair's ``which``
        contexts (same tokens up to the query slot), so that they are not run again. Its full-position
        activations (except attention patterns) become cached activations; its ``FINAL`` at the query slot gives
        the baseline. Equal to a fresh cached forward up to float rounding (different batching). Cost: none."""
        n, w = self.pair.n_contexts, self.width
        mine, theirs = self._tokens(which), run.batch.tokens[:n, :w]
        if run.full_rows < n or theirs.shape != mine.shape or not torch.equal(theirs, mine):
            raise PairError(
                f"the ReadoutRun's first {n} contexts are not this pair's {which!r} contexts (or it kept "
                f"only {run.full_rows} full rows); build the pair from the run's batch"
            )
        if FINAL not in run.names():
            raise PairError(f"the ReadoutRun did not keep {FINAL!r}, which the baseline needs")
        self._store[which].update({k: v[:n, :w] for k, v in run.full.items() if not k.endswith(("pattern", "scores"))})
        final = run.chunks[0][1][FINAL][:n, -1]  # [n, d_model] at the query slot
        self._ld[which] = self.pair.logit_diff(
            to_host(unembed_labels(self.model, final, self.pair.clean.label_token_ids))
        )

    def baseline(self, which: str) -> Float[Tensor, "batch"]:
        """Per-context LD of the unpatched run ``which`` (clean or corrupted): from its stepper's own forward when
        one is built (no extra forward), else from a cached run."""
        if which not in self._ld:
            if which in self._steppers:
                self._ld[which] = self.pair.logit_diff(self._steppers[which].base_logits)
            else:
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
        recv, donor = runs_for(direction)
        spec = KINDS[kind]
        t0, f0 = time.perf_counter(), self.forwards
        b, L = self.pair.n_contexts, self.n_layers
        n_idx = n_index(self.model, spec, self.width)
        if spec.readout_only:  # the steppers' own forwards give the baselines too
            self.stepper("clean"), self.stepper("corrupted")
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
            roles = tuple(
                ROLE_NAMES[int(r[0, p])] if bool((r[:, p] == r[0, p]).all()) else "mixed" for p in range(self.width)
            )
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
            items=self.pair.clean.example_ids,
        )

    @torch.no_grad()
    def _sweep_full(self, spec: SweepKind, recv: str, donor: str, wanted: Tensor, ld: Tensor, computed: Tensor) -> None:
        b, L = self.pair.n_contexts, self.n_layers
        layers = [l for l in range(L) if wanted[l].any()]
        names = [act_name(spec.act, l) for l in layers]
        d_store = self.cached(donor, names)
        pos_kind = spec.axes[1] == "pos"  # receiver activations are needed only to find no-op cells
        r_store = self.cached(recv, (names if pos_kind else []) + [act_name("resid_pre", l) for l in layers if l > 0])
        per = max(1, self.max_rows // b)
        runner = self.suffix_runner(recv, whole=pos_kind) if pos_kind or spec.name == "head_out" else None
        for l in tqdm(layers, desc=f"patch {spec.name}", unit="layer", disable=not self.progress, leave=False):
            name = act_name(spec.act, l)
            idx = [int(i) for i in wanted[l].nonzero()[:, 0]]
            if pos_kind:  # a position where donor == receiver is a no-op patch
                idx = [i for i in idx if not torch.equal(d_store[name][:, i], r_store[name][:, i])]
            if pos_kind and runner is not None:  # a call re-runs from its first cell's position (position 0: full)
                groups = [(g[0], g) for g in suffix_groups(idx, self.width, b, per)]
            else:  # head kinds: every cell re-runs from the shared prefix's end (0 without a runner)
                s = runner.start if runner is not None else 0
                groups = [(s, idx[c0 : c0 + per]) for c0 in range(0, len(idx), per)]
            for s, chunk in groups:
                ld[l, chunk] = self._patch_cells(spec, recv, l, s, chunk, d_store[name], r_store, runner)
                computed[l, chunk] = True

    def _patch_cells(
        self,
        spec: SweepKind,
        recv: str,
        l: int,
        s: int,
        chunk: list[int],
        donor_act: Tensor,
        r_store: dict[str, Tensor],
        runner: SuffixRunner | None,
    ) -> Float[Tensor, "n batch"]:
        """LD of the receiver with each cell of ``chunk`` (layer ``l``) patched, one copy of the batch per cell, in
        one forward of positions ``s .. width-1`` from block ``l`` (over the runner's first ``s`` cached positions;
        full width when ``s == 0``). Cost: ``len(chunk) x (L - l) / L x (width - s) / width`` forwards."""
        b, L, n = self.pair.n_contexts, self.n_layers, len(chunk)
        put, shift = setter(spec, self.pair), s if spec.axes[1] == "pos" else 0
        d_act, tokens = donor_act[:, s:], self._tokens(recv)[:, s:]

        def hook(act: Tensor, hook: Any) -> Tensor:
            a = act.reshape(n, b, *act.shape[1:]).clone()
            for j, i in enumerate(chunk):
                put(a[j], d_act, i - shift)
            return a.reshape(act.shape)

        name = act_name(spec.act, l)
        r0 = r_store[act_name("resid_pre", l)][:, s:].repeat(n, 1, 1) if l > 0 else None
        if s > 0 and runner is not None:
            resid = runner.run(tokens, n, [(name, hook)], l, r0, start=s)
        else:
            resid = run_to_final(self.model, tokens.repeat(n, 1), [(name, hook)], start=(l, r0) if l > 0 else None)
        self.forwards += n * (L - l) / L * (self.width - s) / self.width
        return readout_ld(self.model, self.pair, resid, s, before=self.baseline(recv))

    @torch.no_grad()
    def suffix_runner(self, recv: str, whole: bool = False) -> SuffixRunner | None:
        """The ``SuffixRunner`` the sweeps of run ``recv`` re-run suffixes with, or None where full-width re-runs are
        used (``prefix_reuse=False``, no KV cache, or a first re-run that differs from the full forward: warned; the
        engine's ``reruns.kv_or_full``). ``whole=False``: over the prefix shared by both runs (head kinds, built once
        for both directions, ``p0 / width`` of a forward); ``whole=True``: over ``recv``'s own positions
        ``0 .. width-2`` (sweeps by position, ``(width - 1) / width`` of a forward per run). Each is checked once per
        run against its baseline (a re-run from ``p0``, ``(width - p0) / width`` of a forward)."""
        key = (recv, whole)
        if self.prefix_reuse and key not in self._runners:
            if not kv_or_full(
                "Patcher (prefix reuse; sweeps re-run every position)", "auto", lambda: self._check_runner(recv, whole)
            ):
                self.prefix_reuse = False
                self._runners.clear()
        return self._runners.get(key) if self.prefix_reuse else None

    def _check_runner(self, recv: str, whole: bool) -> None:
        """Build the runner and check its re-run of run ``recv`` from ``p0`` against that run's baseline (``NoKVPath``)."""
        p0 = shared_prefix(self.pair, self.width)
        shared = None if whole else next((r for (_, w), r in self._runners.items() if not w), None)
        if shared is not None:  # the shared prefix's runner, built for the other direction
            r = shared
        else:
            prefix = self._tokens(recv)[:, : self.width - 1] if whole else self._tokens("clean")[:, :p0]
            r = SuffixRunner(self.model, prefix, self.width)
            self.forwards += r.start / self.width
        s = max(1, min(p0, r.start))
        ld = readout_ld(self.model, self.pair, r.run(self._tokens(recv)[:, s:], start=s), s, self.baseline(recv))[0]
        self.forwards += (self.width - s) / self.width
        r.check("the suffix re-run over the cached prefix", ld, self.baseline(recv), atol=1e-4)
        self._runners[(recv, whole)] = r

    @torch.no_grad()
    def patch_heads(self, heads: Sequence[Head], direction: str = "denoise", where: str = "all") -> float:
        """Normalised metric with the outputs of all ``heads`` patched at once.

        ``where``: ``all`` positions, in-context ``label`` positions, or the query ``readout`` slot.
        Patching every head recovers the other run exactly (at the readout slot the
        residual stream is embedding + head outputs + MLPs of that position only).
        Cost: one forward from the lowest patched layer (``readout``: one token per context).
        """
        if where not in ("all", "label", "readout"):
            raise ValueError(f"where must be all, label or readout, got {where!r}")
        recv, donor = runs_for(direction)
        clean_ld, corr_ld = self.baseline("clean"), self.baseline("corrupted")
        heads = sorted(set((int(l), int(h)) for l, h in heads))
        if not heads:
            ld = self.baseline(recv)
        elif where == "readout":
            masks = head_masks([heads], self.n_layers, int(self.model.cfg.n_heads))
            ld = self.pair.logit_diff(self.stepper(recv).run(masks, self.stepper(donor).z))[0]
        else:
            layers = sorted({l for l, _ in heads})
            names = [act_name("z", l) for l in layers]
            d_store = self.cached(donor, names)
            r_store = self.cached(recv, [act_name("resid_pre", layers[0])] if layers[0] > 0 else [])
            put = setter(KINDS["head_out" if where == "all" else "head_out_label"], self.pair)
            hooks = []
            for l in layers:

                def hook(act: Tensor, hook: Any, l: int = l) -> Tensor:
                    a = act.clone()
                    for ll, h in heads:
                        if ll == l:
                            put(a, d_store[act_name("z", l)], h)
                    return a

                hooks.append((act_name("z", l), hook))
            l0 = layers[0]
            start = (l0, r_store[act_name("resid_pre", l0)]) if l0 > 0 else None
            ld = readout_ld(self.model, self.pair, run_to_final(self.model, self._tokens(recv), hooks, start=start))[0]
            self.forwards += (self.n_layers - l0) / self.n_layers
        return float(normalise(ld, clean_ld, corr_ld))

    def stepper(self, which: str) -> "ReadoutStepper":
        """A ``ReadoutStepper`` on run ``which`` (built once)."""
        if which not in self._steppers:
            self._steppers[which] = ReadoutStepper(self.model, self.pair.run(which), max_rows=max(self.max_rows, 256))
            self.forwards += 1
        return self._steppers[which]

    @torch.no_grad()
    def _sweep_readout(
        self, spec: SweepKind, recv: str, donor: str, wanted: Tensor, ld: Tensor, computed: Tensor
    ) -> None:
        L = self.n_layers
        cells = wanted.nonzero().tolist()
        donor_z = self.stepper(donor).z  # [batch, layer, head, d_head] at the query slot
        st = self.stepper(recv)
        masks = head_masks([[(l, h)] for l, h in cells], L, wanted.shape[1])
        logits = st.run(masks, donor_z)  # [cells, batch, n_labels]
        out = self.pair.logit_diff(logits)
        for j, (l, h) in enumerate(cells):
            ld[l, h] = out[j]
            computed[l, h] = True
        self.forwards += st.last_cost


def patch(model: Any, pair: PatchPair, kind: str, direction: str = "denoise", **kw: Any) -> PatchResult:
    """One sweep with a fresh ``Patcher`` (use a ``Patcher`` to share caches between sweeps)."""
    return Patcher(model, pair, **kw).sweep(kind, direction)
