"""Evidence aggregation, total effect: a head's effect on the model's answer *through everything downstream*.

``aggregation.project_heads`` measures a head's *direct* path only (its output projected through the final
norm onto the unembedding). A head whose output is read by a later MLP or head (on organism-strong, L1H1 ->
MLP 1) can matter without a direct projection. Here the effect is measured by patching instead:

**Total effect** of head ``h`` at rendering ``r`` (m flipped labels) in context ``b``: in the same context's
rendering with no label flipped (m = 0), replace ``h``'s ``hook_z`` *at the query readout slot only* by its value
in rendering ``r``; everything downstream at that slot (later heads, every MLP from ``h``'s layer on, the final
norm) is recomputed. The value is the change of the model's own ``logit(flipped label) - logit(true label)`` at
the query slot, patched minus unpatched. Earlier positions (and so every key and value) are those of the m = 0
rendering, so this is the head's effect *at the readout slot*, not through later positions. At m = 0 the donor
is the receiver and the value is 0 by definition. Same units as the direct projection's ``delta`` (logits).

Cost: the donors are the ``hook_z`` kept by ``project_heads`` (no forward). Per chunk of contexts, one
``analysis.engine.stepper.ReadoutStepper`` on the m = 0 rendering (one forward, plus a 3-token self-check in KV mode);
then per rendering with m > 0, one re-run of the query token per head: ``(renderings - 1) x heads`` query tokens
per context when the stepper has a KV cache (Hugging Face bridges, e.g. Gemma), or as many forwards from the
lowest patched layer on (``(n_layers - l) / n_layers`` of a forward) when it falls back to full forwards
(TL-native models: ``tiny`` and the organisms; there it costs about ``heads`` times the projections: 67 s against
21 s for organism-strong, k = 16, 2 x 128 contexts, 4 heads, one thread). Memory: the stepper's prefix cache of
one chunk plus one step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from tqdm.auto import tqdm

from mechicl.analysis.aggregation.direct import Projections
from mechicl.analysis.engine.hooks import head_masks
from mechicl.analysis.engine.stepper import ReadoutStepper
from mechicl.data.evidence import EvidenceBatches


def _check(ev: EvidenceBatches, proj: Projections) -> None:
    if proj.z is None:
        raise ValueError(
            "total_effects needs the heads' hook_z at the query slot: pass the Projections that "
            "aggregation.project_heads returned for these renderings (it keeps them in .z)"
        )
    if tuple(proj.z.shape[:2]) != (len(ev.batches), ev.default.n_contexts) or proj.count != ev.count:
        raise ValueError(
            f"the Projections ({tuple(proj.z.shape[:2])} renderings x contexts) were not made from these "
            f"renderings ({len(ev.batches)} x {ev.default.n_contexts}); run project_heads on the same "
            "EvidenceBatches"
        )


@torch.no_grad()
def total_effects(
    model: Any, ev: EvidenceBatches, proj: Projections, batch_size: int = 64, progress: bool = True
) -> Projections:
    """Each head of ``proj`` patched, at the query readout slot, from every rendering of ``ev`` into its m = 0
    rendering: the change of logit(flipped) - logit(true) there (module docstring). Returns ``proj`` with these
    total effects as ``values`` (``values[0] == 0``, so ``delta == values``), ``measure = "total"`` and no ``z``;
    the model's own P(flipped), accuracy and ``ld_flipped`` are kept, so it feeds ``curves`` and the fits as is.
    ``batch_size`` contexts share one stepper. Cost: see the module docstring."""
    _check(ev, proj)
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    heads = list(proj.heads)
    masks = head_masks([[hd] for hd in heads], L, H)  # one intervention per head
    layer = torch.tensor([l for l, _ in heads], dtype=torch.long)
    head = torch.tensor([h for _, h in heads], dtype=torch.long)
    R, n = len(ev.batches), ev.default.n_contexts
    total = torch.zeros(R, n, len(heads), dtype=torch.float64)
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc="total effects", unit="chunk", disable=not progress or len(starts) < 2, leave=False):
        rows = slice(start, start + batch_size)
        sub = ev.default.select(rows)
        st = ReadoutStepper(model, sub)
        true = sub.true_labels[:, -1]
        flipped = (true + 1) % len(sub.label_words)
        b = torch.arange(sub.n_contexts)
        base = st.base_logits.double()
        base_ld = base[b, flipped] - base[b, true]
        for r in range(1, R):
            source = st.z.clone()  # [b, layer, head, d_head]; only the masked heads are read
            source[:, layer, head] = proj.z[r, rows].to(source.device, source.dtype)
            logits = st.run(masks, source).double()  # [heads, b, n_labels]
            total[r, rows] = (logits[:, b, flipped] - logits[:, b, true] - base_ld).T
    return dataclasses.replace(proj, values=total, z=None, measure="total")
