"""``SuffixRunner``: re-run only the positions a patch can change (from the first one where two runs differ, or
from a patched position), over the cached keys and values of those before.

The two runs of a patching pair have the same tokens up to the first differing label ``p0``, so
(causal attention) the same activations, keys and values there at every layer. A patch that copies
one run's activations into the other changes nothing before ``p0`` either (the runs agree there),
so every patched re-run shares the prefix's keys and values: only positions ``p0 .. width-1`` run,
attending to the cached prefix and to each other. With only the last ``m`` demonstration labels
flipped (``data.pairs.make_pair(last_m=m)``), ``p0`` is near the query and most of a re-run is saved;
with every label flipped the prefix is the text before the first label (short, still exact).

The same runner serves a patch at one position ``p`` of a single run: built over that run's own positions
``0 .. width-2``, ``run(start=p)`` re-runs positions ``p .. width-1`` over the first ``p`` cached positions
(the run's own, unpatched: nothing before ``p`` changes), so the residual / attention / MLP sweeps by
(layer, position) re-run ``width - p`` positions per cell instead of ``width``. ``suffix_groups`` chooses which
cells share one call (a call runs from its earliest cell's position).

A front-end of the re-run engine (``analysis.engine.reruns``: its cache, mask rule and self-check); the cached
residual the re-runs start from is the caller's. Which models: Hugging Face models bridged by TransformerLens with
a transformers KV cache. Not TL-native models (no cache: ``NoKVPath(expected=True)``, the caller runs full width).
Contexts longer than a sliding attention window (Gemma-3-270M: 512 tokens, k = 64 vader-words examples):
the prefix cache keeps every position in every layer and the re-runs' 4D mask applies the window on the
sliding layers (a query at ``q`` sees keys ``p`` with ``q - p < window``, HF's rule), as the readout
stepper does. Callers check the first re-run against their full forward (``Patcher`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechicl.analysis.engine.hooks import Hook
from mechicl.analysis.engine.reruns import ATOL, NoKVPath, cheapest_runs, check_rerun, prefix_cache, rerun, rerun_mask
from mechicl.data.pairs import PatchPair


def shared_prefix(pair: PatchPair, width: int) -> int:
    """Positions before the first one (over all contexts) where clean and corrupted tokens differ, at most
    the earliest query slot (every context's readout stays in the suffix)."""
    diff = (pair.clean.tokens[:, :width] != pair.corrupted.tokens[:, :width]).any(0).nonzero()
    first = int(diff.min()) if len(diff) else width
    return min(first, int(pair.query_pos.min()))


def suffix_mask(model: Any, start: int, width: int) -> Tensor | dict[str, Tensor]:
    """The re-runs' ``[1, 1, width - start, width]`` mask: query ``q`` (positions ``start..width-1``) sees key ``p`` when
    ``p <= q``, and on sliding-window layers only when ``q - p < window`` (``reruns.rerun_mask``)."""
    q, p = torch.arange(start, width)[None], torch.arange(width)[None]
    return rerun_mask(model, p[:, None, :] <= q[:, :, None], q, p)


class SuffixRunner:
    """Forwards of positions ``start .. width-1`` of a batch over the key/value cache of positions ``0 .. start-1``.

    ``prefix``: ``[batch, start]`` tokens, the same in every run that will be re-run (e.g. both runs of a
    pair). Construction runs them once with a KV cache (every layer, all positions kept). ``run`` runs
    ``n`` copies of a ``[batch, width - s]`` suffix in one forward (row ``copy * batch + context``,
    the layout of ``tokens.repeat(n, 1)``) with TL hooks, optionally from block ``layer`` on (blocks
    below it are skipped, ``surgery.start_at``; give the residual entering it at the suffix positions).
    ``s`` is ``start`` by default, or any ``0 < s <= start`` (``run(start=s)``: over the first ``s`` cached
    positions only, views of the cache). Raises ``NoKVPath`` when there is no prefix to reuse or no cache.

    Cost: construction ``start / width`` of a forward; ``run``: ``n`` forwards of ``width - s`` tokens
    (plus attention to the ``s`` cached positions). Memory: the prefix cache, ``batch x start x
    n_layers x 2 x n_kv_heads x d_head`` floats, plus, while one layer attends, that layer's prefix tiled
    ``n`` times.
    """

    def __init__(self, model: Any, prefix: Int[Tensor, "batch start"], width: int) -> None:
        self.model, self.start, self.width = model, int(prefix.shape[1]), int(width)
        if not 0 < self.start < self.width:
            raise NoKVPath(f"no shared prefix to reuse (it has {self.start} of {self.width} positions)")
        self._cache, _ = prefix_cache(model, prefix)
        self._mask = suffix_mask(model, self.start, self.width)

    @property
    def fraction(self) -> float:
        """Re-run tokens per full-width token, ``(width - start) / width`` (forward equivalents of one row)."""
        return (self.width - self.start) / self.width

    @torch.no_grad()
    def run(
        self,
        suffix: Int[Tensor, "batch suffix"],
        n: int = 1,
        hooks: Sequence[Hook] = (),
        layer: int = 0,
        resid: Float[Tensor, "rows suffix d_model"] | None = None,
        start: int | None = None,
    ) -> Float[Tensor, "rows suffix d_model"]:
        """The residual entering the final norm at the suffix positions ``s .. width-1`` (``s = start``, by default
        the runner's) of ``n`` copies of ``suffix`` (``rows = n x batch``; hooks see ``[rows, width - s, ...]``)."""
        s = self.start if start is None else int(start)
        if not 0 < s <= self.start:
            raise ValueError(f"start must be in 1..{self.start} (the cached positions), got {s}")
        if suffix.shape[1] != self.width - s:
            raise ValueError(
                f"suffix has {suffix.shape[1]} positions, expected {self.width - s} (positions {s}..{self.width - 1})"
            )
        rows = n * suffix.shape[0]
        m = self._mask if s == self.start else suffix_mask(self.model, s, self.width)
        mask = {t: x.expand(rows, -1, -1, -1).contiguous() for t, x in m.items()} if isinstance(m, dict) else None
        return rerun(
            self.model,
            self._cache,
            suffix.repeat(n, 1),
            hooks,
            attention_mask=m.expand(rows, -1, -1, -1).contiguous() if mask is None else mask,
            position_ids=torch.arange(s, self.width)[None].expand(rows, -1).contiguous(),
            start=(layer, resid) if layer > 0 else None,
            repeats=n,
            keep=s if s < self.start else None,
        )

    def check(self, what: str, got: Tensor, want: Tensor, atol: float = ATOL) -> None:
        """The engine's self-check of a re-run (``got``) against the caller's full forward (``want``): ``NoKVPath``
        when they differ by more than ``reruns.check_rerun``'s tolerance."""
        check_rerun(what, got, want, self.model, atol)


CALL_COST = 32.0  # one re-run call's fixed cost in row-tokens. Gemma-3-270M, one thread, 2-core AMD EPYC (83 GFLOPS):
# a forward of 4 rows took 81 / 111 / 230 ms at 1 / 4 / 16 tokens, i.e. ~70 ms per call and ~2.5 ms per row-token


def suffix_groups(
    positions: Sequence[int], width: int, rows: int, per: int, call_cost: float = CALL_COST
) -> list[list[int]]:
    """Which patch positions share one suffix re-run: consecutive runs of the sorted ``positions``, at most ``per``
    each, a call running every cell from its group's first position ``s`` (``rows`` rows of ``width - s`` tokens
    per cell). Chosen to minimise ``sum(call_cost + len(group) x rows x (width - s))`` (dynamic programming over the
    cut points, ``reruns.cheapest_runs``; ``call_cost`` in row-tokens). Cost: ``len(positions) x per`` steps, no
    forwards."""
    p = sorted(int(x) for x in positions)
    runs = cheapest_runs(len(p), per, lambda j, size: call_cost + size * rows * (width - p[j]))
    return [p[a:b] for a, b in runs]
