"""``SlotStepper``: re-run every readout slot with ``k >= k_min`` of every context, with head-output
interventions at that slot only.

A front-end of the re-run engine (``analysis.engine.reruns``). ``ReadoutStepper`` re-runs one slot per context
(the query). Findings need more data per context: a context with examples ``0..K`` has a readout slot for every
``k`` (the prediction of example ``k``'s label after ``k`` labelled examples), and each is a measurement. An
intervention at slot ``s`` changes nothing before it, so every slot's re-run can share one key/value cache of
the whole context: the re-run copy of slot ``s`` sees the cached positions before ``s`` and itself only.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.analysis.engine import reruns, surgery
from mechicl.analysis.engine.hooks import act_name, capture, run_to_final
from mechicl.analysis.engine.readout import unembed_labels
from mechicl.data.prompts import PromptBatch

# A spilled stepper's run reads this much of its cache at a time (Gemma-3-270M: 13 contexts of 558 tokens); its
# ``attribution`` less: the backward keeps the keys and values again, once per query head (Gemma: 4x).
SPILL_READ_BYTES, ATTRIBUTION_READ_BYTES = 2**28, 2**25


class SlotStepper:
    """Label logits at every readout slot ``k >= k_min`` under head-output interventions at that slot.

    ``slots``: example indices ``k_min .. n_examples - 1`` (slot ``s`` has seen ``k_min + s`` labelled
    examples). On construction the whole context (left-padded, ``reruns.left_pad``) runs once, keeping its
    key/value cache and every head's output (``hook_z``) at each slot. ``run`` appends ``n x S`` tokens per
    context (``n`` interventions x ``S`` slots); a 4D mask lets copy ``(i, s)`` see the cache before slot ``s``
    and itself, at slot ``s``'s position id: exact, independent re-runs (checked on construction against
    the full forward). Models without a usable KV cache fall back to one full forward per
    (intervention, slot) row (``mode == "full"``, ``reruns.kv_or_full``).

    Cost: construction 1 forward, in chunks of rows of similar length of at most ``build_tokens`` tokens each
    (``reruns.length_chunks``: no row padded to the batch's longest); ``run``: ``n x S`` one-token steps per context
    from the lowest intervened layer on (kv; calls grouped by that layer, ``reruns.layer_chunks``) or ``n x S``
    forwards per context (full). Memory: the batch's KV cache, ``z`` at the slots (``batch x S x n_layers x
    n_heads x d_head`` floats); a step's attention scores stay under ``score_bytes`` (the chunking of ``run``).
    """

    def __init__(
        self,
        model: Any,
        batch: PromptBatch,
        k_min: int,
        *,
        step_tokens: int = 8192,
        build_tokens: int = 1024,
        max_rows: int = 64,
        score_bytes: int = 2**26,
        mode: str = "auto",
        atol: float = reruns.ATOL,
    ) -> None:
        if not 0 <= k_min < batch.n_examples:
            raise ValueError(
                f"k_min={k_min} must be in [0, {batch.n_examples - 1}] for {batch.n_examples}-example contexts"
            )
        self.model, self.batch, self.k_min = model, batch, k_min
        self.step_tokens, self.max_rows, self.score_bytes = step_tokens, max_rows, score_bytes
        self.build_tokens = build_tokens
        self.pos = batch.readout_pos[:, k_min:]  # [b, S] readout positions of the slots
        self.label_ids = batch.label_token_ids
        self.n_layers, self.n_heads = reruns.dims(model)
        self.layout = reruns.left_pad(batch.tokens, batch.readout_pos[:, -1])
        self._cols = self.pos + self.layout.offset[:, None]  # [b, S] slot columns in the left-padded layout
        self._cache = None
        self._spilled: Path | None = None  # the file holding the KV cache while it is out of memory (``spill``)
        self._kv_store: dict[str, Tensor] | None = None  # every layer's hook_k / hook_v: full mode's route patching
        self.mode = "kv" if reruns.kv_or_full("SlotStepper", mode, lambda: self._init_kv(atol)) else "full"
        if self.mode == "full":
            self._cache = None
            self._init_full()

    @property
    def width(self) -> int:
        """Positions ``0 .. max(query slot)``: the columns of the left-padded layout and of the full forwards."""
        return self.layout.width

    @property
    def n_slots(self) -> int:
        return int(self.pos.shape[1])

    @property
    def true_labels(self) -> Int[Tensor, "batch slot"]:
        return self.batch.true_labels[:, self.k_min :]

    def _z_names(self) -> list[str]:
        return [act_name("z", l) for l in range(self.n_layers)]

    def _post_names(self) -> list[str]:
        """The post-attention norm's scale per layer (Gemma-3's ``post_attention_layernorm``), if the model has one."""
        names = [f"blocks.{l}.ln1_post.hook_scale" for l in range(self.n_layers)]
        return names if all(n in self.model.hook_dict for n in names) else []

    def _keep_post_scale(self, store: dict[str, Tensor]) -> None:
        """``post_scale [b, S, L]``: the post-attention norm's divisor at every slot (None without such a norm)."""
        names = self._post_names()
        self.post_scale = torch.stack([store[n].reshape(*store[n].shape[:2]) for n in names], 2) if names else None

    @torch.no_grad()
    def _init_kv(self, atol: float) -> None:
        lay, b = self.layout, self.batch.n_contexts
        res_names = [act_name("resid_pre", l) for l in range(1, self.n_layers)]
        names = self._z_names() + self._post_names() + res_names + ["final"]
        store: dict[str, Tensor] = {}
        self._cache = None
        for rows in reruns.length_chunks(self.batch.readout_pos[:, -1], self.build_tokens):
            sub = reruns.left_pad(self.batch.tokens[rows], self.batch.readout_pos[rows, -1])  # the chunk's own width
            cols = self._cols[rows] - (lay.width - sub.width)  # [m, S] slot columns in the chunk's layout
            part: dict[str, Tensor] = {}
            # every position kept: appended steps must not evict the prefix
            cache, resid = reruns.prefix_cache(
                self.model,
                sub.tokens,
                capture(names[:-1], part, at=cols),
                attention_mask=sub.mask,
                position_ids=sub.pos,
            )
            part["final"] = resid[torch.arange(len(rows))[:, None], cols]  # [m, S, d]
            self._cache = surgery.place_rows(self._cache, cache, rows, b, lay.width)
            del cache, resid
            for n in names:
                store.setdefault(n, part[n].new_empty(b, *part[n].shape[1:]))[rows] = part[n]
        self.z = torch.stack([store[n] for n in self._z_names()], 2)  # [b, S, L, H, d]
        self._keep_post_scale(store)
        self._resid_pre = {l: store[act_name("resid_pre", l)] for l in range(1, self.n_layers)}  # [b, S, d]
        self.base_logits = unembed_labels(self.model, store["final"], self.label_ids)  # [b, S, labels]
        self.mode = "kv"
        check = self.run(torch.zeros(2, self.n_layers, self.n_heads, dtype=torch.bool))
        reruns.check_rerun("the slots' KV re-run", check, self.base_logits[None], self.model, atol)

    @torch.no_grad()
    def _init_full(self) -> None:
        store: dict[str, Tensor] = {}
        resid = run_to_final(
            self.model,
            self.batch.tokens[:, : self.width],
            capture(self._z_names() + self._post_names(), store, at=self.pos),
        )
        self.z = torch.stack([store[n] for n in self._z_names()], 2)
        self._keep_post_scale(store)
        rows = torch.arange(self.batch.n_contexts)[:, None]
        self.base_logits = unembed_labels(self.model, resid[rows, self.pos], self.label_ids)

    @torch.no_grad()
    def run(
        self, masks: Bool[Tensor, "n layer head"], source: Float[Tensor, "..."] | None = None, progress: bool = False
    ) -> Float[Tensor, "n batch slot n_labels"]:
        """Label logits at every slot for ``n`` interventions.

        Intervention ``i`` replaces the slot output of every head with ``masks[i, layer, head]`` by
        ``source`` (``None``: zero; ``[batch, slot, layer, head, d_head]``: per context and slot,
        e.g. a donor context's output at the same slot; ``[layer, head, d_head]``: one vector).
        """
        if self._spilled is not None:  # a range of contexts at a time, its cache rows read back from the file
            return self._in_ranges(SPILL_READ_BYTES, lambda v, src: v.run(masks, src, progress), source, 1)
        n, S, b = masks.shape[0], self.n_slots, self.batch.n_contexts
        per = self._kv_chunk(n) if self.mode == "kv" else max(1, self.max_rows // S)  # full: max_rows rows a forward
        step = self._run_kv if self.mode == "kv" else self._run_full
        chunks = reruns.layer_chunks(masks, per, rows=b * S)  # grouped by the lowest layer (each re-runs from its own)
        with self._resident():
            parts = [
                (idx, step(masks[idx], source))
                for idx in tqdm(chunks, desc="slot interventions", unit="chunk", disable=not progress, leave=False)
            ]
        return reruns.in_order(parts, n) if parts else torch.zeros(0, b, S, len(self.label_ids))

    @torch.no_grad()
    def run_mixed(
        self, donor: SlotStepper, from_donor: Bool[Tensor, "n batch slot width"], keep_z: Sequence[int] = ()
    ) -> tuple[Float[Tensor, "n batch slot n_labels"], dict[int, Float[Tensor, "n batch slot head d_head"]]]:
        """Label logits at every slot when its re-run attends to ``donor``'s keys and values at the positions
        ``from_donor[i, :, s]`` (left-padded columns) and to this run's everywhere else: intervention ``i`` is the
        information that reaches slot ``s`` from those positions, through every layer's attention, with nothing
        else changed (route patching, ``analysis.prior.routes``). ``donor``: the same contexts rendered otherwise
        (same token layout). Also returns the slot's head outputs (``hook_z``) of the layers ``keep_z``.
        Cost (kv): ``n x S`` one-token steps per context over both caches joined (memory: both caches again).
        Full mode (no KV cache): ``n x S`` forwards per context up to the slot, every layer's keys and values
        before the slot overwritten from both renderings' cached ``hook_k`` / ``hook_v`` (cached once per stepper:
        ``2 x n_layers x batch x width x n_kv_heads x d_head`` floats each)."""
        if not (torch.equal(self.layout.mask, donor.layout.mask) and torch.equal(self._cols, donor._cols)):
            raise ValueError("the donor must render the same contexts with the same token layout")
        if from_donor.shape[1:] != (self.batch.n_contexts, self.n_slots, self.width):
            raise ValueError(f"from_donor must be [n, {self.batch.n_contexts}, {self.n_slots}, {self.width}]")
        run = self._mixed_kv if self.mode == "kv" and donor.mode == "kv" else self._mixed_full
        with self._resident(), donor._resident():
            return run(donor, from_donor, list(keep_z))

    def spill(self, path: Path) -> None:
        """Keep the KV cache in the file ``path`` (the caller's to remove) instead of memory from now on: ``run`` reads
        back ranges of contexts of at most ``SPILL_READ_BYTES`` of cache rows (``attribution``: ``ATTRIBUTION_READ_BYTES``),
        ``run_mixed`` the whole cache, and each drops it after. Why: a Gemma-3-270M findings cell held the validation
        draw's two caches (2 x 0.66 GB) while the confirmation draw's ran (``docs/findings.md``, "Cost"). Cost: one
        write now, one read per call (from the page cache when memory allows). No-op without a KV cache (full mode)."""
        if self._cache is not None and self._spilled is None:
            surgery.spill_cache(self._cache, path)
            self._spilled = path

    def _in_ranges(self, budget: int, call: Callable, source: Tensor | None, dim: int) -> Tensor:
        """``call(view, source)`` on ranges of contexts (``budget`` bytes of spilled cache rows), joined on ``dim``."""
        ranges = surgery.row_ranges(self._cache, budget)
        cut = source is not None and source.dim() == 5  # [batch, slot, layer, head, d_head]; else one vector per head
        return torch.cat([call(self._rows(r), source[r] if cut else source) for r in ranges], dim)

    def _rows(self, rows: slice) -> SlotStepper:
        """This stepper restricted to the contexts ``rows``, their cache rows read back from the spill file."""
        v = copy.copy(self)
        lay = self.layout
        v.batch = self.batch.select(rows)
        v.layout = reruns.LeftPadded(lay.tokens[rows], lay.mask[rows], lay.pos[rows], lay.offset[rows])
        v._cols, v.pos, v.z, v.base_logits = self._cols[rows], self.pos[rows], self.z[rows], self.base_logits[rows]
        v._resid_pre = {l: x[rows] for l, x in self._resid_pre.items()}
        v.post_scale = None if self.post_scale is None else self.post_scale[rows]
        v._cache = copy.copy(self._cache)
        v._cache.layers = [copy.copy(layer) for layer in self._cache.layers]
        surgery.load_cache(v._cache, self._spilled, rows)
        v._spilled = None
        return v

    @contextlib.contextmanager
    def _resident(self) -> Iterator[None]:
        """The KV cache in memory for the duration (read back from its file when spilled, dropped again after)."""
        if self._spilled is None:
            yield
            return
        surgery.load_cache(self._cache, self._spilled)
        try:
            yield
        finally:
            surgery.drop_cache(self._cache)

    def _mixed_kv(self, donor: SlotStepper, from_donor: Tensor, keep_z: list[int]) -> tuple[Tensor, dict]:
        """Chunks of interventions (``_kv_chunk`` over both caches' keys), the caches joined once."""
        cache, n = surgery.joined_cache(self._cache, donor._cache), from_donor.shape[0]
        per = self._kv_chunk(n, keys=2 * self.width)
        parts = [self._mixed_step(cache, from_donor[c : c + per], keep_z) for c in range(0, n, per)]
        return torch.cat([p[0] for p in parts]), {l: torch.cat([p[1][l] for p in parts]) for l in keep_z}

    def _mixed_step(self, cache: Any, from_donor: Tensor, keep_z: list[int]) -> tuple[Tensor, dict]:
        lay, W = self.layout, self.width
        n, b, S = from_donor.shape[:3]
        cols = self._cols.repeat(1, n)  # [b, n*S]: copy (i, s) re-runs slot s
        before = (torch.arange(W)[None, None] < cols[:, :, None]) & lay.mask[:, None].bool()  # [b, n*S, W]
        fd = from_donor.transpose(0, 1).reshape(b, n * S, W)
        ok = torch.cat([before & ~fd, before & fd], -1)  # this run's columns, then the donor's
        q_pos = lay.pos.gather(1, cols)
        mask = reruns.copies_mask(self.model, ok, q_pos, torch.cat([lay.pos, lay.pos], 1))
        store: dict[str, Tensor] = {}
        hooks = capture([act_name("z", l) for l in keep_z], store)
        resid = reruns.rerun(
            self.model, cache, lay.tokens.gather(1, cols), hooks, attention_mask=mask, position_ids=q_pos
        )
        logits = unembed_labels(self.model, resid, self.label_ids).view(b, n, S, -1).transpose(0, 1)
        z = {l: store[act_name("z", l)] for l in keep_z}  # [b, n*S, head, d]
        return logits, {l: x.reshape(b, n, S, *x.shape[2:]).transpose(0, 1) for l, x in z.items()}

    def _kv_at_all(self) -> dict[str, Tensor]:
        """Every layer's ``hook_k`` / ``hook_v`` of this run (full mode's route patching), computed once."""
        if self._kv_store is None:
            names = [act_name(x, l) for l in range(self.n_layers) for x in ("k", "v")]
            self._kv_store = {}
            run_to_final(self.model, self.batch.tokens[:, : self.width], capture(names, self._kv_store))
        return self._kv_store

    def _mixed_full(self, donor: SlotStepper, from_donor: Tensor, keep_z: list[int]) -> tuple[Tensor, dict]:
        """Forwards of rows (context, intervention, slot) in token positions, at most ``max_rows`` rows each; every
        layer's keys and values before a row's slot set from the two runs' caches, the slot's own computed."""
        n, b, S = from_donor.shape[:3]
        W, off = self.width, self.layout.offset
        idx = torch.arange(W)[None] + off[:, None]  # [b, W]: the column of each token position
        fd = from_donor.gather(3, idx.clamp(max=W - 1)[None, :, None].expand(n, b, S, W)) & (idx < W)[None, :, None]
        fd = fd.transpose(0, 1).reshape(b, n * S, W)  # [b, n*S, pos]
        pos = self.pos.repeat(1, n)  # [b, n*S]: row (i, s) reads slot s
        kv = (self._kv_at_all(), donor._kv_at_all())
        cb = max(1, self.max_rows // (n * S))  # contexts per forward
        logits, zs = [], []
        for c0 in range(0, b, cb):
            c = slice(c0, min(b, c0 + cb))
            lg, z = self._mixed_rows(c, fd[c], pos[c], kv, keep_z)
            logits.append(lg)
            zs.append(z)
        out = torch.cat(logits, 0).view(b, n, S, -1).transpose(0, 1)
        return out, {
            l: torch.cat([z[l] for z in zs], 0).view(b, n, S, *zs[0][l].shape[2:]).transpose(0, 1) for l in keep_z
        }

    def _mixed_rows(self, c: slice, fd: Tensor, pos: Tensor, kv: tuple[dict, dict], keep_z: list[int]) -> tuple:
        m, rows = fd.shape[:2]
        before = torch.arange(self.width)[None, None] < pos[:, :, None]  # [m, rows, W]
        store: dict[str, Tensor] = {}

        def mix(name: str) -> Any:
            def hook(x: Tensor, hook: Any) -> Tensor:
                mine, theirs = kv[0][name][c][:, None], kv[1][name][c][:, None]  # [m, 1, W, kv_heads, d]
                want = torch.where(fd[..., None, None], theirs, mine)
                x = x.reshape(m, rows, *x.shape[1:])
                return torch.where(before[..., None, None], want, x).reshape(-1, *x.shape[2:])

            return hook

        hooks = [(nm, mix(nm)) for nm in kv[0]] + capture([act_name("z", l) for l in keep_z], store)
        resid = run_to_final(self.model, self.batch.tokens[c, : self.width].repeat_interleave(rows, 0), hooks)
        r, flat = torch.arange(m * rows), pos.reshape(-1)
        z = {l: store[act_name("z", l)][r, flat].view(m, rows, *store[act_name("z", l)].shape[2:]) for l in keep_z}
        return unembed_labels(self.model, resid[r, flat], self.label_ids).view(m, rows, -1), z

    def _kv_chunk(self, n: int, keys: int | None = None) -> int:
        """Interventions per step: at most ``step_tokens`` appended tokens, and attention scores
        (``batch x heads x n*S x (keys + n*S)`` floats, ``keys`` cached: ``width`` by default) under ``score_bytes``."""
        b, S, keys = self.batch.n_contexts, self.n_slots, self.width if keys is None else keys
        per = max(1, min(n, self.step_tokens // max(1, b * S)))
        while per > 1 and 4 * b * self.n_heads * per * S * (keys + per * S) > self.score_bytes:
            per = (per + 1) // 2
        return per

    def attribution(
        self, source: Float[Tensor, "batch slot layer head d_head"] | None, metric: Callable[[Tensor, Tensor], Tensor]
    ) -> Float[Tensor, "batch slot layer head"]:
        """First-order estimate of each head's replacement effect at each slot on ``metric``.

        ``metric(logits [b, S, labels], true_labels [b, S]) -> [b, S]`` (e.g. P(true label)). Estimate:
        ``(source - z) . d metric(slot) / d z(slot)``, the gradient taken at the re-run copy of each slot, so it holds
        the slot's own effect only (attribution patching, Nanda 2023). Cost: ``S`` tokens per context forward and
        backward (kv; spilled: one backward per ``ATTRIBUTION_READ_BYTES`` of cache rows) or ``S`` forwards and
        backwards per context (full)."""
        S, b = self.n_slots, self.batch.n_contexts
        if self._spilled is not None:
            return self._in_ranges(ATTRIBUTION_READ_BYTES, lambda v, src: v.attribution(src, metric), source, 0)
        store: dict[str, Tensor] = {}
        hooks = capture(self._z_names(), store, grad=True)
        with torch.enable_grad(), self._resident():
            if self.mode == "kv":
                resid = self._step(self._cols, hooks)
                logits = unembed_labels(self.model, resid, self.label_ids)  # [b, S, labels]
                at = lambda x: x  # noqa: E731 - copies are already [b, S, ...]
            else:
                rows_pos = self.pos.reshape(-1)
                resid = run_to_final(self.model, self.batch.tokens[:, : self.width].repeat_interleave(S, 0), hooks)
                logits = unembed_labels(self.model, resid[torch.arange(b * S), rows_pos], self.label_ids).view(b, S, -1)
                at = lambda x: x[torch.arange(b * S), rows_pos].view(b, S, *x.shape[2:])  # noqa: E731
            zs = [store[n] for n in self._z_names()]
            grads = torch.autograd.grad(metric(logits, self.true_labels).sum(), zs)
        g = torch.stack([at(x) for x in grads], 2)  # [b, S, L, H, d]
        src = torch.zeros_like(self.z) if source is None else source.expand_as(self.z)
        return ((src - self.z) * g).sum(-1)

    def _step_mask(self, cols: Int[Tensor, "batch rows"]) -> Tensor | dict[str, Tensor]:
        """The 4D mask of appended copies re-running the slots at ``cols`` (left-padded columns): each sees the
        prefix before its column and itself (``reruns.copies_mask``; the window on sliding layers)."""
        lay = self.layout
        prefix_ok = (torch.arange(self.width)[None, None] < cols[:, :, None]) & lay.mask[:, None].bool()
        return reruns.copies_mask(self.model, prefix_ok, lay.pos.gather(1, cols), lay.pos)

    def _step(self, cols: Int[Tensor, "batch rows"], hooks: list, start: tuple[int, Tensor] | None = None) -> Tensor:
        """Appended copies re-running the slots at ``cols`` over the cache (one token each)."""
        lay = self.layout
        return reruns.rerun(
            self.model,
            self._cache,
            lay.tokens.gather(1, cols),
            hooks,
            attention_mask=self._step_mask(cols),
            start=start,
            position_ids=lay.pos.gather(1, cols),
        )

    def _run_kv(self, masks: Tensor, source: Tensor | None) -> Tensor:
        n, S, b = masks.shape[0], self.n_slots, self.batch.n_contexts
        cols = self._cols.repeat(1, n)  # [b, n*S]: copy (i, s) re-runs slot s
        l0 = reruns.lowest_layer(masks)  # blocks below the lowest intervened layer are unchanged
        start = (l0, self._resid_pre[l0].repeat(1, n, 1)) if l0 > 0 else None
        resid = self._step(cols, reruns.z_hooks(masks, source, S, b), start)
        return unembed_labels(self.model, resid, self.label_ids).view(b, n, S, -1).transpose(0, 1)

    def _run_full(self, masks: Tensor, source: Tensor | None) -> Tensor:
        n, S, b = masks.shape[0], self.n_slots, self.batch.n_contexts
        cb = max(1, self.max_rows // (n * S))  # contexts per forward: at most max_rows rows (or one context)
        out = []
        for c0 in range(0, b, cb):
            rows = slice(c0, min(b, c0 + cb))
            pos = self.pos[rows]
            m = pos.shape[0]
            rows_pos = pos[:, None, :].expand(m, n, S).reshape(-1)
            src = source if source is None or source.dim() == 3 else source[rows]
            tokens = self.batch.tokens[rows, : self.width].repeat_interleave(n * S, 0)
            resid = run_to_final(self.model, tokens, reruns.z_hooks(masks, src, S, m, rows_pos))
            logits = unembed_labels(self.model, resid[torch.arange(len(rows_pos)), rows_pos], self.label_ids)
            out.append(logits.view(m, n, S, -1))
        return torch.cat(out, 0).transpose(0, 1)
