"""Where readout slots look: attention to label tokens, prefix-matching (PM) and induction scores.

All positions come from the PromptBatch: the *query* of example ``i`` is its readout
slot ``readout_pos[:, i]`` (the token that predicts label ``i``); the label tokens
it can see are ``label_pos[:, :i]``, the inputs it can see ``input_spans[:, :i+1]``.

One hooked forward per context gives every head's attention row at every readout
slot; the model stops at its final norm (no unembedding). Each key position falls
into exactly one category, so the masses of a query sum to 1:

  ``first``          position 0 (BOS when the model prepends one);
  ``label_same``     earlier label tokens whose word is the query's *true* class;
  ``label_other``    earlier label tokens showing another class;
  ``input_earlier``  input tokens of earlier examples;
  ``input_query``    the query's own input tokens;
  ``template``       every other visible token (separators, "Label:", the slot itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechicl.analysis.engine.hooks import act_name, capture, run_to_final, to_host
from mechicl.analysis.engine.readout import ReadoutRun, readout_activations
from mechicl.analysis.inside.frames import heads_frame
from mechicl.data.prompts import TEMPLATE, PromptBatch

CATEGORIES = ("first", "label_same", "label_other", "input_earlier", "input_query", "template")


def pattern_names(model: Any) -> list[str]:
    """The hooks ``readout_patterns`` reads: every layer's attention pattern."""
    return [act_name("pattern", l) for l in range(model.cfg.n_layers)]


def readout_patterns(
    model: Any, batch: PromptBatch, batch_size: int = 8, progress: bool = True, run: ReadoutRun | None = None
) -> Float[Tensor, "batch example layer head key"]:
    """Attention rows of every head at every readout slot. Cost: one forward per context, no unembedding (none
    with ``run``, a ``ReadoutRun`` of ``batch`` that kept ``pattern_names``).

    Memory: ``batch x example x n_layers x n_heads x pos`` floats (~20 MB for 32 Gemma contexts of 16 examples).
    """
    n_layers = model.cfg.n_layers
    out = torch.zeros(batch.n_contexts, batch.n_examples, n_layers, model.cfg.n_heads, batch.tokens.shape[1])
    names, start = pattern_names(model), 0
    for sub, store in readout_activations(model, batch, names, batch_size, progress, desc="attention", run=run):
        for l, name in enumerate(names):  # [b, example, head, key]
            x = to_host(store[name])
            out[start : start + sub.n_contexts, :, l, :, : x.shape[-1]] = x
        start += sub.n_contexts
    return out


def context_patterns(
    model: Any, batch: PromptBatch, row: int, heads: Sequence[tuple[int, int]], run: ReadoutRun | None = None
) -> Float[Tensor, "head query key"]:
    """Full attention patterns of the given (layer, head)s on context ``row`` (unpadded). One forward, none when
    ``run`` (a ``ReadoutRun`` of ``batch``) kept the patterns of ``row`` at every position."""
    n = int(batch.lengths[row])
    names = [act_name("pattern", l) for l in sorted({l for l, _ in heads})]
    if run is not None and run.batch is batch and row < run.full_rows and all(m in run.full for m in names):
        store = {m: run.full[m][row : row + 1, :, :n, :n] for m in names}
    else:
        store = {}
        with torch.no_grad():
            run_to_final(model, batch.tokens[row : row + 1, :n], capture(names, store))
    return torch.stack([to_host(store[act_name("pattern", l)][0, h]) for l, h in heads])


def key_categories(batch: PromptBatch) -> Bool[Tensor, "batch example category key"]:
    """For each readout slot, which key positions fall in each of ``CATEGORIES`` (a partition of 0..slot)."""
    n, k = batch.label_pos.shape
    pos = torch.arange(batch.tokens.shape[1])
    visible = pos[None, None] <= batch.readout_pos[..., None]  # [b, ex, W]
    first = (pos == 0)[None, None].expand(n, k, -1)
    s, e = batch.input_spans[..., 0:1], batch.input_spans[..., 1:2]
    in_ex = (pos >= s) & (pos < e)  # [b, j, W]: input tokens of example j
    lab_ex = pos[None, None] == batch.label_pos[..., None]  # [b, j, W]
    before = torch.tril(torch.ones(k, k), diagonal=-1)  # [i, j]: j < i
    same = (batch.shown_labels[:, None, :] == batch.true_labels[:, :, None]).float()  # [b, i, j]
    lab_same = torch.einsum("bij,bjw->biw", before * same, lab_ex.float()) > 0
    lab_other = torch.einsum("bij,bjw->biw", before * (1 - same), lab_ex.float()) > 0
    in_earlier = torch.einsum("ij,bjw->biw", before, in_ex.float()) > 0
    template = visible & (batch.roles == TEMPLATE)[:, None]
    rest = torch.stack([lab_same, lab_other, in_earlier, in_ex, template], dim=2) & ~first[:, :, None]
    return torch.cat([first[:, :, None], rest], dim=2)


def label_token_attention(
    patterns: Float[Tensor, "batch example layer head key"], batch: PromptBatch
) -> Float[Tensor, "batch example layer head source"]:
    """Attention from readout slot ``i`` to the label token of every example ``j`` (zero where ``j >= i``)."""
    idx = batch.label_pos[:, None, None, None, :].expand(*patterns.shape[:4], batch.n_examples)
    att = patterns.gather(-1, idx)
    k = batch.n_examples
    earlier = torch.tril(torch.ones(k, k, dtype=torch.bool), diagonal=-1)  # [i, j]
    return att * earlier[None, :, None, None, :]


@dataclass(frozen=True)
class LabelAttention:
    """Per-head attention of readout slots, by key category, by label distance/class, and PM scores.

    ``mass``: condition, layer, head, category, mean (over queries with k >= k_min), n.
    ``by_distance``: condition, layer, head, distance (examples back), same_class (demo's true
    class == query's), same_word (shown word == query's true class), mean attention per label token, n.
    ``pm``: condition, layer, head, pm (by the demonstrations' true classes), pm_word (by shown words).
    """

    mass: pd.DataFrame = field(repr=False)
    by_distance: pd.DataFrame = field(repr=False)
    pm: pd.DataFrame = field(repr=False)

    def label_mass(self, condition: str = "default") -> pd.DataFrame:
        """Total attention to earlier label tokens per head (``label_same + label_other``)."""
        m = self.mass[(self.mass.condition == condition) & self.mass.category.isin(["label_same", "label_other"])]
        return m.groupby(["layer", "head"], as_index=False)["mean"].sum().rename(columns={"mean": "label_attention"})


def pm_scores(
    att_lab: Float[Tensor, "batch example layer head source"], batch: PromptBatch, n_classes: int, by: str = "true"
) -> Float[Tensor, "batch example layer head"]:
    """PM_h = sum_j A(q->y_j) 1[same class] - 1/(C-1) sum_j A(q->y_j) 1[other class], per query.

    ``by="true"`` compares each demonstration's true class with the query's (Halawi et al.'s
    prefix matching: same-class inputs); ``by="word"`` compares the class the label word shows.
    """
    demo = batch.true_labels if by == "true" else batch.shown_labels
    same = (demo[:, None, :] == batch.true_labels[:, :, None]).float()[:, :, None, None, :]  # [b, i, 1, 1, j]
    return (att_lab * same).sum(-1) - (att_lab * (1 - same)).sum(-1) / max(n_classes - 1, 1)


def label_attention(
    model: Any,
    batches: Sequence[PromptBatch],
    n_classes: int,
    k_min: int = 1,
    batch_size: int = 8,
    progress: bool = True,
    patterns: Sequence[Tensor] | None = None,
) -> LabelAttention:
    """Label attention, its class/distance breakdown and PM scores for each batch (one per condition).

    Cost: one forward per context per batch (skipped when ``patterns`` from ``readout_patterns`` are given).
    """
    if not batches:
        raise ValueError("label_attention needs at least one PromptBatch")
    if not 1 <= k_min < batches[0].n_examples:
        raise ValueError(f"k_min must be in 1..{batches[0].n_examples - 1} (queries need earlier labels), got {k_min}")
    mass_rows, dist_rows, pm_rows = [], [], []
    for bi, batch in enumerate(batches):
        pat = patterns[bi] if patterns is not None else readout_patterns(model, batch, batch_size, progress)
        q = slice(k_min, None)  # queries with at least k_min earlier labels
        mass_rows += _category_mass(pat, batch, q)
        att = label_token_attention(pat, batch)  # [b, i, L, H, j]
        dist_rows += _by_distance(att, batch, k_min)
        pm_true = pm_scores(att, batch, n_classes, "true")[:, q].mean((0, 1)).numpy()
        pm_word = pm_scores(att, batch, n_classes, "word")[:, q].mean((0, 1)).numpy()
        pm_rows.append(heads_frame(pm_true, condition=batch.condition, pm=pm_true.ravel(), pm_word=pm_word.ravel()))
    return LabelAttention(
        pd.concat(mass_rows, ignore_index=True),
        pd.concat(dist_rows, ignore_index=True),
        pd.concat(pm_rows, ignore_index=True),
    )


# ------------------------------------------------------------ induction ---


def _category_mass(pat: Tensor, batch: PromptBatch, q: slice) -> list[pd.DataFrame]:
    """Per head, the mean attention mass of the queries ``q`` on each key category (one frame per category)."""
    cats = key_categories(batch).float()
    mass = torch.einsum("bilhw,bicw->bilhc", pat, cats)[:, q]  # [b, iq, L, H, C]
    mean = mass.mean((0, 1)).numpy()  # [L, H, C]
    return [
        heads_frame(
            mean, condition=batch.condition, category=name, mean=mean[..., c].ravel(), n=mass.shape[0] * mass.shape[1]
        )
        for c, name in enumerate(CATEGORIES)
    ]


def _by_distance(att: Tensor, batch: PromptBatch, k_min: int) -> list[pd.DataFrame]:
    """Per head, the mean attention from query i to label j < i by distance i - j, same class, same word."""
    n_layers, n_heads = att.shape[2:4]
    k = batch.n_examples
    i_idx, j_idx = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    keep = (j_idx < i_idx) & (i_idx >= k_min)  # [i, j]
    dist = (i_idx - j_idx)[keep]  # [pairs]
    same_cls = (batch.true_labels[:, :, None] == batch.true_labels[:, None, :])[:, keep]  # [b, pairs]
    same_word = (batch.true_labels[:, :, None] == batch.shown_labels[:, None, :])[:, keep]
    vals = att.permute(0, 2, 3, 1, 4)[..., keep]  # [b, L, H, pairs]
    keys = (dist[None].expand_as(same_cls) * 4 + same_cls.long() * 2 + same_word.long()).reshape(-1)
    flat = vals.permute(0, 3, 1, 2).reshape(-1, n_layers * n_heads)  # [b*pairs, L*H]
    uniq, inv = torch.unique(keys, return_inverse=True)
    sums = torch.zeros(len(uniq), n_layers * n_heads).index_add_(0, inv, flat)
    counts = torch.bincount(inv, minlength=len(uniq)).float()
    rows = []
    for u, key in enumerate(uniq.tolist()):
        m = (sums[u] / counts[u]).reshape(n_layers, n_heads).numpy()
        rows.append(
            heads_frame(
                m,
                condition=batch.condition,
                distance=key // 4,
                same_class=bool(key & 2),
                same_word=bool(key & 1),
                mean=m.ravel(),
                n=int(counts[u]),
            )
        )
    return rows


def induction_scores(model: Any, tokens: Int[Tensor, "batch pos"], offset: int) -> pd.DataFrame:
    """Olsson et al.'s induction score per head on repeated random tokens (``data.batches.repeated_random_tokens``):
    mean attention from each token of the second copy to the token after its first occurrence.
    Cost: one forward of ``tokens``."""
    seq_len = (tokens.shape[1] - offset) // 2
    q = offset + seq_len + torch.arange(seq_len)  # second copy
    k = offset + torch.arange(seq_len) + 1  # token after the first occurrence
    names = [act_name("pattern", l) for l in range(model.cfg.n_layers)]
    store: dict[str, Tensor] = {}
    with torch.no_grad():
        run_to_final(model, tokens, capture(names, store))
    s = torch.stack([to_host(store[n][:, :, q, k].float().mean((0, 2))) for n in names]).numpy()  # [layer, head]
    return heads_frame(s, induction=s.ravel())
