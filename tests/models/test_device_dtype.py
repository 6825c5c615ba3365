"""Devices and dtypes on the CPU: names and errors, explicit cpu = default, bfloat16/float16 against float32
within stated tolerances, a Hugging Face model built in bfloat16, and an accelerate ``device_map`` split.

Tolerances were measured with ``benchmarks/device_check.py --cpu-dtypes --models organism-strong --sweep head_out``
(4 contexts x 8 examples): bfloat16 label logits differ from float32 by at most 3.3e-2 (max |logit| 8.3), the
normalised head_out sweep by 1.4e-3, DLA components by 2.0e-2; float16 by 7.0e-3, 2.6e-4 and 4.1e-3. The bounds
below are about 3x those.
"""

from __future__ import annotations

import platform

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mechicl.analysis.engine.hooks import run_to_final
from mechicl.analysis.engine.readout import label_logits
from mechicl.analysis.inside.dla import direct_logits
from mechicl.analysis.patching.exact import Patcher
from mechicl.data.pairs import pair_for
from mechicl.data.tasks import load_task
from mechicl.data.words import tiny_tokenizer
from mechicl.errors import ConfigError
from mechicl.models import device as dev
from mechicl.models.device import release_host_memory
from mechicl.models.loading import load_model
from tests import helpers
from tests.helpers import TINY_HF_CONFIG

TOL = {
    "bfloat16": (0.1, 5e-3, 0.06),
    "float16": (0.02, 1e-3, 0.015),
}  # (label logits, normalised sweep, DLA), ~3x measured


# ------------------------------------------------------------ names and errors ---


def test_dtype_names_and_aliases():
    assert dev.resolve_dtype("bf16") is torch.bfloat16 and dev.resolve_dtype("float16") is torch.float16
    assert dev.resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ConfigError, match="unknown dtype 'int8': use one of float32, bfloat16, float16"):
        dev.resolve_dtype("int8")


def test_device_errors_name_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"cuda requested but torch.cuda.is_available\(\) is False.*use --device cpu"):
        dev.resolve_device("cuda")
    with pytest.raises(ConfigError, match="mps requested.*use --device cpu"):
        dev.resolve_device("mps")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        dev.resolve_device("tpu")
    with pytest.raises(ConfigError, match="cuda requested"):  # before any weights load
        load_model("tiny", device="cuda")


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dev.resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match="cuda:1 requested but only 1 GPU"):
        dev.resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert dev.resolve_device("auto") == torch.device("mps")


def test_device_map_needs_a_hugging_face_model():
    with pytest.raises(ConfigError, match="device_map needs a Hugging Face model"):
        load_model("tiny", device_map="auto")
    with pytest.raises(ConfigError, match="both place the model"):
        load_model("tiny", device="cuda", device_map="auto")


def test_run_to_final_moves_inputs_to_the_model_device():
    """A stand-in model on the meta device records where its inputs arrive."""
    seen = {}

    class Stub:
        cfg = type("Cfg", (), {"device": "meta"})()

        def run_with_hooks(self, tokens, fwd_hooks, **kw):
            seen.update(tokens=tokens.device, **{k: v.device for k, v in kw.items()})
            fwd_hooks[-1][1](torch.zeros(1, 2, 3, device="meta"), None)

    out = run_to_final(Stub(), torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2))
    assert seen == {"tokens": torch.device("meta"), "attention_mask": torch.device("meta")} and out.is_meta


# ------------------------------------------------------------ cpu and dtypes ---


def test_explicit_cpu_float32_equals_default(tiny, toy):
    b = helpers.batch(tiny, toy)
    explicit = load_model("tiny", device="cpu", dtype="float32")
    assert (explicit.device, explicit.dtype, explicit.device_map) == ("cpu", "float32", None)
    assert torch.equal(label_logits(explicit.model, b, progress=False), label_logits(tiny.model, b, progress=False))


@pytest.fixture(scope="module")
def organism_f32():
    loaded = load_model("organism-strong")
    task = load_task("organism")
    return loaded, task, pair_for(loaded, task, 4, 8, seed=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_agrees_with_float32(organism_f32, dtype):
    """The readout, two sweeps (all positions; readout slot via the stepper) and DLA in half precision on the CPU."""
    ref, task, pair = organism_f32
    half = load_model("organism-strong", dtype=dtype)
    assert half.dtype == dtype and {p.dtype for p in half.model.parameters()} == {getattr(torch, dtype)}
    tol_logits, tol_sweep, tol_dla = TOL[dtype]
    a, b = label_logits(ref.model, pair.clean, progress=False), label_logits(half.model, pair.clean, progress=False)
    assert b.dtype == torch.float32 and b.device.type == "cpu"  # results leave analyses as CPU float32
    assert 0 < (a - b).abs().max() <= tol_logits  # > 0: it really ran in half precision
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    for kind in ("head_out", "head_out_readout"):
        x, y = Patcher(ref.model, pair).sweep(kind).values, Patcher(half.model, pair).sweep(kind).values
        assert (x - y).abs().max() <= tol_sweep, kind
    dla_ref, dla_half = (
        direct_logits(ref.model, pair.clean, progress=False),
        direct_logits(half.model, pair.clean, progress=False),
    )
    assert (dla_ref.contrib - dla_half.contrib).abs().max() <= tol_dla  # its sums are checked at 2 eps of the dtype


# ------------------------------------------------- Hugging Face dir, split ---


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A random 2-layer Llama (GQA, rotary) saved with the tiny tokenizer, as load_model reads a local HF model."""
    cfg = LlamaConfig(**TINY_HF_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    loaded = load_model(str(path))
    return path, loaded, pair_for(loaded, helpers.toy_task(), 4, 6, seed=0)


def test_hf_model_built_in_bfloat16_keeps_float32_rotary(llama_dir):
    path, ref, pair = llama_dir
    half = load_model(str(path), dtype="bf16")
    params = {p.dtype for p in half.model.parameters()}
    inv_freq = {b.dtype for n, b in half.model.named_buffers() if n.endswith("inv_freq")}
    assert params == {torch.bfloat16} and inv_freq == {torch.float32} and half.model.cfg.dtype == torch.bfloat16
    a, b = label_logits(ref.model, pair.clean, progress=False), label_logits(half.model, pair.clean, progress=False)
    assert 0 < (a - b).abs().max() <= 0.05  # random weights: logits ~0.1-1; measured 1e-2 or less
    p = Patcher(half.model, pair)
    p.sweep("head_out_readout")
    assert p.stepper("corrupted").mode == "kv"  # the KV re-run passes its self-check in bfloat16 too


def test_device_map_split_equals_one_device(llama_dir):
    """An accelerate split (layer 1 offloaded to disk: accelerate's hooks run every module) gives the same numbers."""
    path, ref, pair = llama_dir
    split_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    split = load_model(str(path), device_map=split_map)
    assert split.is_split and split.device_map == split_map and split.device == "cpu"
    assert torch.equal(
        label_logits(split.model, pair.clean, progress=False), label_logits(ref.model, pair.clean, progress=False)
    )
    for kind in ("head_out", "head_out_readout"):
        assert torch.equal(
            Patcher(split.model, pair).sweep(kind).values, Patcher(ref.model, pair).sweep(kind).values
        ), kind
    with pytest.raises(ConfigError, match="offloads the unembedding"):
        load_model(str(path), device_map={**split_map, "model.layers.1": "cpu", "lm_head": "disk"})


def test_release_host_memory_returns_free_heap_pages_and_keeps_live_tensors():
    keep = torch.arange(1000, dtype=torch.float32)
    garbage = [torch.ones(4096) for _ in range(2000)]  # ~32 MB of small heap allocations
    del garbage
    released = release_host_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert released is True  # freed chunks became whole free pages: malloc_trim gave some back
    assert torch.equal(keep, torch.arange(1000, dtype=torch.float32))
