"""benchmarks/nnsight_peer.py, P1's second peer: nnsight's documented patching loop over the plain Hugging Face model
equals mechicl's ``head_out`` sweep and TransformerLens's on tiny HF models (Llama and Gemma-3 layouts, GQA).
Skipped where nnsight is not installed (CI installs ``.[test]`` only; nnsight is in ``.[bench]``)."""

from __future__ import annotations

import sys
from functools import partialmethod
from pathlib import Path

import pytest
import torch
import transformer_lens.patching as tlp

from mechicl.analysis.patching.exact import Patcher
from mechicl.data.pairs import pair_for
from tests import helpers

nnsight = pytest.importorskip("nnsight")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from nnsight_peer import nnsight_head_sweep, nnsight_peer, plain_hf  # noqa: E402


def test_plain_hf_shares_the_bridges_tensors_and_logits(toy):
    loaded = helpers.tiny_hf("gemma3")
    hf = plain_hf(loaded.model)
    assert "Bridge" not in "".join(type(m).__name__ for m in hf.modules())  # no bridge component left
    bridged = dict(loaded.model.original_model.named_parameters())
    assert (
        hf.model.layers[1].self_attn.o_proj.weight
        is bridged["model.layers.1._original_component.self_attn._original_component.o_proj._original_component.weight"]
    )
    tokens = pair_for(loaded, toy, 2, 4).clean.tokens
    with torch.no_grad():
        assert torch.equal(hf(tokens).logits, loaded.model(tokens))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_nnsight_sweep_equals_mechicl_and_transformer_lens(toy, arch, monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.setattr(tqdm, "__init__", partialmethod(tqdm.__init__, disable=True))
    loaded = helpers.tiny_hf(arch)
    pair = pair_for(loaded, toy, 3, 5)
    peer = nnsight_head_sweep(nnsight_peer(loaded.model), pair)
    got = peer.values
    ours = Patcher(loaded.model, pair).sweep("head_out", "denoise").values
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(pair.clean.tokens)
        ref = tlp.get_act_patch_attn_head_out_all_pos(
            loaded.model, pair.corrupted.tokens, cache, helpers.tl_metric(loaded, pair)
        )
    assert got.shape == (2, 4) and float(got.std()) > 0.05  # the heads' effects differ: not a constant
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(got, ours, atol=1e-4, rtol=0)
    torch.testing.assert_close(got, (peer.logit_diff - peer.corrupted_ld) / (peer.clean_ld - peer.corrupted_ld))


def test_one_cell_patches_only_that_head(toy):
    """``cells``: the other cells stay 0, and the cell equals its value in the full sweep (the slice is the head's)."""
    loaded = helpers.tiny_hf("llama")
    pair = pair_for(loaded, toy, 3, 5)
    peer = nnsight_peer(loaded.model)
    full, one = nnsight_head_sweep(peer, pair).values, nnsight_head_sweep(peer, pair, cells=[(1, 2)]).values
    assert one[1, 2] == full[1, 2] and int((one != 0).sum()) == 1


def test_a_native_bridge_is_skipped_with_a_message(tiny, capsys):
    assert nnsight_peer(tiny.model) is None
    assert "nnsight arm is skipped" in capsys.readouterr().out
