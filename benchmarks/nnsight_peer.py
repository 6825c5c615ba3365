"""nnsight 0.8, the second peer of P1: the all-heads output patching sweep written as nnsight's documentation writes
a patching loop, on the same Hugging Face weights as the bridge.

The loop follows nnsight's "Activation Patching" tutorial and its patterns pages (docs/patterns/activation-patching.md,
"Sweep over layers"; docs/patterns/per-head-attention.md, inline reshape): one trace of the clean prompt saves the
activations, one trace of the corrupted prompt gives the baseline, then one ``model.trace(corrupted)`` per
(layer, head) writes the clean value into the head's slice in place and saves the metric. A head's output is its
``z`` (TransformerLens ``hook_z``, mechicl's ``head_out``): the input of ``self_attn.o_proj`` in Llama / Gemma-3 is
the per-head ``z`` concatenated, ``[batch, pos, n_heads * d_head]``, patched at every position.

nnsight wraps the plain Hugging Face model (``plain_hf``: the bridge's modules unwrapped, its tensors shared, no
copy), as a user of nnsight would load it, not the bridge (whose wrappers and hook points would be in its path).
Cost: ``2 + L * H`` full forwards (full-vocabulary logits at every position), like TransformerLens's sweep.
Imports nnsight lazily: this module loads without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class PeerSweep:
    """nnsight's sweep: ``values`` the normalised effects, ``logit_diff`` the patched runs' mean logit differences
    (un-normalised), both ``[n_layers, n_heads]`` (0 outside the cells run), and its own two baselines."""

    values: Tensor
    logit_diff: Tensor
    clean_ld: float
    corrupted_ld: float


def nnsight_version() -> str | None:
    """The installed nnsight's version, or None when it is not installed (``pip install -e '.[bench]'``)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("nnsight")
    except PackageNotFoundError:
        return None


def plain_hf(bridge: Any) -> Any:
    """The bridge's Hugging Face model as plain Hugging Face modules (eager attention, eval mode), sharing every
    parameter and buffer with the bridge (no copy: the weights are the ones mechicl and TransformerLens run).

    ``TransformerBridge`` replaces the HF model's submodules by its own components, the originals kept under
    ``_original_component``; the same names without that segment are the plain model's names."""
    from transformers import AutoModelForCausalLM

    bridged = bridge.original_model
    tensors = chain(bridged.named_parameters(remove_duplicate=False), bridged.named_buffers(remove_duplicate=False))
    src = {name.replace("._original_component", ""): t for name, t in tensors}
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(bridged.config, attn_implementation="eager")
    names = chain(hf.named_parameters(remove_duplicate=False), hf.named_buffers(remove_duplicate=False))
    for name, _ in list(names):
        owner, _, leaf = name.rpartition(".")
        module = hf.get_submodule(owner)
        if name not in src:
            raise KeyError(f"{name} of the plain {type(hf).__name__} has no tensor in the bridge")
        slot = module._parameters if leaf in module._parameters else module._buffers
        slot[leaf] = src[name]
    return hf.eval()


def nnsight_peer(bridge: Any) -> Any:
    """``nnsight.NNsight`` over ``plain_hf(bridge)``, or None (and a printed line saying why) without nnsight."""
    if nnsight_version() is None:
        print("[bench] nnsight is not installed (pip install -e '.[bench]'): the nnsight arm is skipped", flush=True)
        return None
    from transformers import PreTrainedModel

    if not isinstance(getattr(bridge, "original_model", None), PreTrainedModel):
        print("[bench] not a Hugging Face model (a boot_native bridge): the nnsight arm is skipped", flush=True)
        return None
    from nnsight import NNsight

    return NNsight(plain_hf(bridge))


def nnsight_head_sweep(model: Any, pair: Any, cells: list[tuple[int, int]] | None = None) -> PeerSweep:
    """The effects (denoising: (patched - corrupted) / (clean - corrupted) of the mean answer - foil logit difference
    at the query slot) of patching each head's clean ``z`` into the corrupted run at every position; ``model`` is
    ``nnsight_peer(bridge)``. Baselines from its own two traces. ``cells``: only these (layer, head) cells (the
    rest stay 0), e.g. one cell to warm up. Cost: ``2 + len(cells)`` full forwards."""
    import nnsight

    layers = model.model.layers
    n_layers, n_heads = len(layers), int(model.config.num_attention_heads)
    d_head = int(getattr(model.config, "head_dim", None) or model.config.hidden_size // n_heads)
    rows, q, a, f = torch.arange(pair.n_contexts), pair.query_pos, pair.answer_ids, pair.foil_ids

    def ld(logits: Tensor) -> Tensor:  # [batch, pos, vocab] -> the mean logit difference, a scalar
        at = logits[rows, q]
        return (at[rows, a] - at[rows, f]).mean()

    with torch.no_grad():
        with model.trace(pair.clean.tokens):
            clean_z = nnsight.save([layers[l].self_attn.o_proj.input for l in range(n_layers)])  # save the list
            clean_ld = ld(model.lm_head.output).save()
        with model.trace(pair.corrupted.tokens):
            corrupted_ld = ld(model.lm_head.output).save()
        raw, done = torch.zeros(n_layers, n_heads), torch.zeros(n_layers, n_heads, dtype=torch.bool)
        for l, h in cells or [(l, h) for l in range(n_layers) for h in range(n_heads)]:
            cols = slice(h * d_head, (h + 1) * d_head)
            with model.trace(pair.corrupted.tokens):
                layers[l].self_attn.o_proj.input[:, :, cols] = clean_z[l][:, :, cols]
                patched_ld = ld(model.lm_head.output).save()
            raw[l, h], done[l, h] = patched_ld, True
    c, r = float(clean_ld), float(corrupted_ld)
    return PeerSweep(torch.where(done, (raw - r) / (c - r), 0.0), raw, c, r)
