"""``models.loading.load_in_place`` reads a safetensors file straight into a model built without random init: every
tensor equals safetensors' own ``load_model`` (tied embeddings stored once included); a wrong shape or dtype, or a
file cut short, is a clear error."""

from __future__ import annotations

import pytest
import safetensors.torch as st
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.initialization import no_init_weights

from mechicl.errors import ModelUnavailable
from mechicl.models.weights import load_in_place


def _config(**kw) -> LlamaConfig:
    kw = {"vocab_size": 97, **kw}
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **kw,
    )


def _empty(cfg: LlamaConfig) -> LlamaForCausalLM:
    with no_init_weights():
        m = LlamaForCausalLM(cfg)
    m.tie_weights()
    return m


def _mapped_file(ptr: int) -> str | None:
    """The file the kernel maps at address ``ptr`` (``/proc/self/maps``), None for anonymous memory."""
    for line in open("/proc/self/maps"):
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5].strip() if len(parts) > 5 and parts[5].strip().startswith("/") else None
    return None


@pytest.mark.parametrize("tied", [True, False])
def test_equals_safetensors_load_model(tmp_path, tied):
    torch.manual_seed(0)
    cfg = _config(tie_word_embeddings=tied)
    src = LlamaForCausalLM(cfg)
    st.save_model(src, str(tmp_path / "model.safetensors"))  # a tied weight is stored once
    mine, ref = _empty(cfg), LlamaForCausalLM(_config(tie_word_embeddings=tied))
    assert load_in_place(mine, tmp_path / "model.safetensors") == ([], [])
    st.load_model(ref, str(tmp_path / "model.safetensors"), strict=False)
    a, b = mine.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(mine.lm_head.weight, src.lm_head.weight)


def test_wrong_shape_dtype_or_short_file_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    st.save_model(LlamaForCausalLM(_config(vocab_size=98)), str(tmp_path / "wide.safetensors"))
    with pytest.raises(ModelUnavailable, match="rebuild the cached model"):
        load_in_place(_empty(_config()), tmp_path / "wide.safetensors")
    st.save_model(LlamaForCausalLM(_config()), str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelUnavailable, match="ends inside"):
        load_in_place(_empty(_config()), tmp_path / "cut.safetensors")
    half = LlamaForCausalLM(_config()).to(torch.float16)
    st.save_model(half, str(tmp_path / "half.safetensors"))
    m = _empty(_config())
    load_in_place(m, tmp_path / "half.safetensors")  # another float dtype is converted, as load_model does
    assert torch.equal(m.model.norm.weight, half.model.norm.weight.float())


def test_a_tensor_the_file_lacks_is_reported_missing(tmp_path):
    """An untied unembedding absent from the file is missing (it would stay uninitialised): the loader refuses it."""
    torch.manual_seed(0)
    src = LlamaForCausalLM(_config(tie_word_embeddings=False))
    st.save_file({k: v for k, v in src.state_dict().items() if k != "lm_head.weight"}, str(tmp_path / "m.safetensors"))
    assert load_in_place(_empty(_config(tie_word_embeddings=False)), tmp_path / "m.safetensors") == (
        ["lm_head.weight"],
        [],
    )


def test_the_input_embedding_is_mapped_not_read_and_writes_never_reach_the_file(tmp_path):
    """The tied embedding's bytes stay in the file (a copy-on-write memory map): equal values, the unembedding the same
    tensor, and an in-place write changes this model only, not the file nor a model loaded from it afterwards."""
    torch.manual_seed(0)
    src = LlamaForCausalLM(_config(tie_word_embeddings=True))
    path = tmp_path / "model.safetensors"
    st.save_model(src, str(path))
    before = path.read_bytes()
    m = _empty(_config(tie_word_embeddings=True))
    assert load_in_place(m, path) == ([], [])
    w = m.get_input_embeddings().weight
    assert _mapped_file(w.data_ptr()) == str(path) and w.data_ptr() == m.lm_head.weight.data_ptr()
    assert torch.equal(w, src.get_input_embeddings().weight)
    with torch.no_grad():
        w[3] = 7.0
    assert torch.equal(m.lm_head.weight[3], torch.full((32,), 7.0)) and path.read_bytes() == before
    again = _empty(_config(tie_word_embeddings=True))
    load_in_place(again, path)
    assert torch.equal(again.get_input_embeddings().weight, src.get_input_embeddings().weight)


def test_an_embedding_the_map_cannot_serve_is_read(tmp_path):
    """float16 in the file, float32 in the model: converted by the reader, as before (no map)."""
    torch.manual_seed(0)
    half = LlamaForCausalLM(_config()).to(torch.float16)
    st.save_model(half, str(tmp_path / "half.safetensors"))
    m = _empty(_config())
    load_in_place(m, tmp_path / "half.safetensors")
    w = m.get_input_embeddings().weight
    assert _mapped_file(w.data_ptr()) is None
    assert torch.equal(w, half.get_input_embeddings().weight.float())
