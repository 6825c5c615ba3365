"""The one-forward readout: label-set log-probabilities at every readout slot.

The model runs up to its final norm's input (``ln_final.hook_in``) and stops
(``hooks.run_to_final``: the one early-stop mechanism every analysis uses); the unembedding
is then applied only at readout slots and only to the label
tokens. For Gemma-3 (262k-word vocabulary) that skips 54% of a 300-token forward (``benchmarks/bench_forward.py``, 1 thread).
Results equal the model's full logits restricted to the label tokens (tested).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl.analysis.engine.hooks import FINAL, capture, run_to_final, to_host
from mechicl.data.prompts import PromptBatch
from mechicl.errors import ModelUnavailable


def unembed_labels(
    model: Any, resid: Float[Tensor, "... d_model"], label_ids: Int[Tensor, "n_labels"] | None
) -> Float[Tensor, "... n_labels"]:
    """Final norm + unembedding restricted to ``label_ids`` (all tokens if None), with the model's
    logit soft-capping if it has one. The norm runs in the model's dtype; the unembedding and
    everything after it in float32 (bfloat16/float16 models are upcast here; float32 is unchanged).
    Runs on the unembedding's device (the last shard of a split model)."""
    W_U = model.W_U
    x = model.ln_final(resid.to(W_U.device)).float()
    cols = slice(None) if label_ids is None else label_ids.to(W_U.device)
    logits = x @ W_U[:, cols].float()
    b_U = getattr(model, "b_U", None)
    if b_U is not None:
        logits = logits + b_U[cols].float()
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    if not bool(torch.isfinite(logits).all()):  # every label logit of every command passes here
        bad = int((~torch.isfinite(logits)).sum())
        raise ModelUnavailable(
            f"the model gave non-finite label logits (NaN or inf) in {bad} of {logits.numel()} values: its weights "
            f"are damaged (save or download the model again) or the computation overflowed (a float16 model: use "
            f"float32 or bfloat16; an intervention of infinite size)"
        )
    return logits


@dataclass(frozen=True)
class ReadoutRun:
    """One forward per context of ``batch`` (``readout_run``), its activations kept so that several analyses read
    them instead of each running its own forward (pass it as ``run=``).

    ``chunks``: per chunk of contexts, the chunk and its activations at the readout slots (``[b, example, ...]``;
    attention patterns ``[b, example, head, key]``). ``full``: whole-sequence activations (``[full_rows, pos, ...]``,
    patterns ``[full_rows, head, query, key]``, pos = the first chunk's width) of the first ``full_rows`` contexts,
    for analyses that need every position (attention views, patching caches).
    """

    batch: PromptBatch
    chunks: tuple[tuple[PromptBatch, dict[str, Tensor]], ...]
    full: dict[str, Tensor]
    full_rows: int
    requested: frozenset[str]  # the readout-slot hooks asked for (a hook the model never fires, e.g. Gemma's
    # hook_pos_embed under rotary embeddings, is asked for but absent, as in a plain forward)

    def names(self) -> set[str]:
        """The hooks kept at the readout slots (those that fired)."""
        return set(self.chunks[0][1]) if self.chunks else set()


def _forward_chunks(
    model: Any,
    batch: PromptBatch,
    names: Sequence[str],
    batch_size: int,
    progress: bool,
    desc: str,
    stop: str,
    first_hooks: Sequence[Any] = (),
) -> Iterator[tuple[PromptBatch, dict[str, Tensor]]]:
    """The one chunk loop behind ``readout_activations`` and ``readout_run``: per chunk, the chunk and ``names`` at
    its readout slots; ``first_hooks`` are added to the first chunk's forward only."""
    for start in tqdm(
        range(0, batch.n_contexts, batch_size),
        desc=f"{desc} {batch.condition}",
        unit="batch",
        disable=not progress,
        leave=False,
    ):
        sub = batch.select(slice(start, start + batch_size))
        acts: dict[str, Tensor] = {}
        hooks = capture(names, acts, at=sub.readout_pos) + (list(first_hooks) if start == 0 else [])
        with torch.no_grad():
            run_to_final(model, sub.tokens, hooks, stop=stop, attention_mask=sub.attention_mask)
        yield sub, acts


def readout_run(
    model: Any,
    batch: PromptBatch,
    names: Sequence[str],
    batch_size: int = 8,
    progress: bool = True,
    stop: str = "ln_final.hook_out",
    full_names: Sequence[str] = (),
    full_rows: int = 0,
) -> ReadoutRun:
    """Run ``batch`` once, keeping hooks ``names`` at its readout slots and ``full_names`` at every position of
    the first ``full_rows`` contexts (which must fit in the first chunk).

    Cost: one forward per context, stopped at ``stop`` (no unembedding). Memory: every chunk's readout-slot
    activations (``batch x example x ...`` per name) plus the full activations of ``full_rows`` contexts.
    """
    if full_rows > min(batch_size, batch.n_contexts):
        raise ValueError(
            f"full_rows={full_rows} must fit in the first chunk (batch_size={batch_size}, "
            f"{batch.n_contexts} contexts); raise batch_size or keep fewer full rows"
        )
    full: dict[str, Tensor] = {}
    first = capture(full_names, full) if full_rows else []
    chunks = tuple(_forward_chunks(model, batch, names, batch_size, progress, "shared run", stop, first))
    return ReadoutRun(batch, chunks, {n: x[:full_rows] for n, x in full.items()}, full_rows, frozenset(names))


def readout_activations(
    model: Any,
    batch: PromptBatch,
    names: Sequence[str],
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "forward",
    stop: str = FINAL,
    run: ReadoutRun | None = None,
) -> Iterator[tuple[PromptBatch, dict[str, Tensor]]]:
    """Per chunk of ``batch_size`` contexts: the chunk and the activations of hooks ``names`` at its readout slots.

    Each activation ``[b, pos, ...]`` is gathered to ``[b, example, ...]`` and detached. Cost: one
    forward per context, stopped at ``stop`` (no unembedding); none when ``run`` (a ``ReadoutRun`` of this
    batch that kept ``names``) is given: its chunks are read instead. Memory: one chunk's activations.
    """
    if run is None:
        yield from _forward_chunks(model, batch, names, batch_size, progress, desc, stop)
        return
    if run.batch is not batch:
        raise ValueError(
            f"the ReadoutRun was made for another batch ({run.batch.condition!r}, "
            f"{run.batch.n_contexts} contexts); pass the run of this batch"
        )
    missing = [n for n in names if n not in run.requested]
    if missing:
        raise ValueError(f"the ReadoutRun did not keep {missing}; add them to readout_run's names")
    for sub, acts in run.chunks:  # a hook that never fired is absent, as in a plain forward
        yield sub, {n: acts[n] for n in names if n in acts}


@torch.no_grad()
def label_logits(
    model: Any, batch: PromptBatch, batch_size: int = 8, progress: bool = True
) -> Float[Tensor, "batch example n_labels"]:
    """Logits of the label words at every readout slot (float32, on the CPU). Cost: one forward per context.

    Memory: one residual stream of ``batch_size x pos x d_model`` floats at a time.
    """
    out = []
    for sub, acts in readout_activations(model, batch, [FINAL], batch_size, progress):
        at = acts[FINAL]  # [b, example, d_model]: the residual entering the final norm
        out.append(to_host(unembed_labels(model, at, sub.label_token_ids)))
    return torch.cat(out)


@torch.no_grad()
def label_sequence_logprobs(
    model: Any, batch: PromptBatch, rows_per_forward: int = 16, progress: bool = True
) -> Float[Tensor, "batch example n_labels"]:
    """log p(whole label word | context before it) for every class at every example.

    For labels of several tokens: each (example, class) gets its own sequence,
    the context up to that example's label followed by the class's tokens, so the
    cost is ``n_examples * n_labels`` forwards of the prefix per context (batched
    ``rows_per_forward`` at a time), not one. Log-softmax over the result
    normalises over the label set (sequence-level scoring).
    """
    seqs = batch.label_token_seqs or tuple((int(t),) for t in batch.label_token_ids)
    out = torch.zeros(batch.n_contexts, batch.n_examples, len(seqs))
    for i in tqdm(
        range(batch.n_contexts), desc=f"label sequences {batch.condition}", disable=not progress, leave=False
    ):
        rows = [(j, c, int(batch.label_pos[i, j])) for j in range(batch.n_examples) for c in range(len(seqs))]
        for start in range(0, len(rows), rows_per_forward):
            chunk = rows[start : start + rows_per_forward]
            width = max(p + len(seqs[c]) for _, c, p in chunk)
            toks = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, (_j, c, p) in enumerate(chunk):
                toks[r, :p] = batch.tokens[i, :p]
                toks[r, p : p + len(seqs[c])] = torch.tensor(seqs[c])
                mask[r, : p + len(seqs[c])] = 1
            resid = run_to_final(model, toks, attention_mask=mask)
            for r, (j, c, p) in enumerate(chunk):
                q = torch.tensor(seqs[c])
                logp = to_host(torch.log_softmax(unembed_labels(model, resid[r, p - 1 : p - 1 + len(q)], None), -1))
                out[i, j, c] = logp[torch.arange(len(q)), q].sum()
    return out
