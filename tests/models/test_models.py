from __future__ import annotations

import time

import pytest

from mechicl.data.fetch import pip_download, verify_sha256
from mechicl.errors import ModelUnavailable, ResourceUnavailable, UnknownModel
from mechicl.models.loading import load_model


def test_unknown_model_lists_choices():
    with pytest.raises(UnknownModel, match="unknown model 'gpt-17'.*smollm2-135m"):
        load_model("gpt-17")


def test_hub_model_offline_fails_fast_with_a_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    t = time.perf_counter()
    with pytest.raises(ModelUnavailable, match="could not load 'nobody/no-such-model'.*Fix:"):
        load_model("nobody/no-such-model")
    assert time.perf_counter() - t < 30


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelUnavailable, match="no config.json"):
        load_model(str(tmp_path))


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MECHICL_CACHE", str(tmp_path))
    with pytest.raises(ResourceUnavailable, match="(?s)could not download 'mechicl-no-such-package==0.0.1'.*Fix:"):
        pip_download("mechicl-no-such-package==0.0.1")


def test_corrupt_file_is_detected(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    with pytest.raises(ResourceUnavailable, match="delete it and run again"):
        verify_sha256(f, "0" * 64)


def test_tiny_model(tiny):
    assert tiny.prepend_bos and tiny.model.cfg.n_layers == 2
    assert tiny.tokenizer("input : w3").input_ids[-1] == tiny.tokenizer.convert_tokens_to_ids("w3")
