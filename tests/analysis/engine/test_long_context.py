"""Long contexts (issue 14): the behaviour readout, the readout-slot stepper and the all-position head sweep at
k = 64 examples, against brute-force references (one plain forward per k, one hooked forward per head).

The tiny TL-native model has no KV cache (steppers run full forwards); the tiny Gemma-3 layout with an 8-token
sliding window puts the contexts far past the window, the regime of Gemma-3-270M (512-token window) at k = 64,
where the readout stepper keeps every position in its cache and applies the window in its masks.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mechicl.analysis.engine.readout import label_logits
from mechicl.analysis.patching.exact import Patcher
from mechicl.data.pairs import pair_for
from mechicl.data.prompts import build_prompt_batch
from tests import helpers

K = 64


def brute_force_heads(loaded, pair, readout_only: bool) -> torch.Tensor:
    """Normalised metric ``[layer, head]`` of each head's ``hook_z`` patched clean -> corrupted (at the query slot
    only, or at every position): one ``run_with_hooks`` forward per head, baselines from plain forwards."""
    L, H = int(loaded.model.cfg.n_layers), int(loaded.model.cfg.n_heads)
    ld, clean_ld, corr_ld = helpers.hooked_head_patch(
        loaded.model, pair, [(l, h) for l in range(L) for h in range(H)], readout_only
    )
    return ((ld - corr_ld) / (clean_ld - corr_ld)).view(L, H)


def _models():
    return [("tiny", helpers.tiny_model()), ("tiny-gemma3, window 8", helpers.tiny_hf("gemma3", sliding_window=8))]


@pytest.mark.parametrize("which", [0, 1], ids=["tiny", "gemma3-window8"])
def test_readout_at_k64_equals_prompting_once_per_k(toy, which):
    name, loaded = _models()[which]
    b = helpers.batch(loaded, toy, n_contexts=2, n_examples=K)
    n_ctx = loaded.n_ctx
    assert 256 < int(b.lengths.max()) < n_ctx, (int(b.lengths.max()), n_ctx)  # long, and still fits the model
    fast = label_logits(loaded.model, b, progress=False)
    assert torch.isfinite(fast).all()
    for k in range(K):
        short = build_prompt_batch(
            toy,
            loaded.tokenizer,
            b.example_ids[:, : k + 1],
            n_ctx=n_ctx,
            prepend_bos=True,
            shown_labels=b.shown_labels[:, : k + 1],
        )
        with torch.no_grad():
            for i in range(b.n_contexts):
                n = int(short.lengths[i])
                logits = loaded.model(short.tokens[i : i + 1, :n])[0, short.readout_pos[i, -1]]
                assert torch.allclose(fast[i, k], logits[b.label_token_ids], atol=1e-4), (name, k, i)


@pytest.mark.parametrize("which", [0, 1], ids=["tiny", "gemma3-window8"])
def test_head_sweeps_at_k64_equal_brute_force(toy, which):
    name, loaded = _models()[which]
    pair = pair_for(loaded, toy, 2, K)
    assert 256 < int(pair.query_pos.max()) < loaded.n_ctx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prefix reuse declines contexts past a window (and says so); exact either way
        patcher = Patcher(loaded.model, pair)
        readout = patcher.sweep("head_out_readout", "denoise")
        every = patcher.sweep("head_out", "denoise")
    if which == 1:  # past the window the stepper keeps its KV path (one token per head), not full forwards
        assert patcher.stepper("corrupted").mode == "kv"
    for res, readout_only in ((readout, True), (every, False)):
        ref = brute_force_heads(loaded, pair, readout_only)
        assert torch.isfinite(res.values).all() and torch.isfinite(res.logit_diff).all()
        helpers.assert_patch_close(res, ref)  # in logits of raw LD: the normalised scale can be ill-conditioned
        assert ref.abs().max() > 1e-3, (name, res.kind)  # the comparison is not of zeros
