"""finesteer.models.load_model on every supported transformers: the dtype keyword, and a model
folder saved by transformers 5 (the bundled demo model) loading with its chat template."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from finesteer.demo.pipeline import MODEL_DIR  # noqa: E402
from finesteer.models import _dtype_keyword, load_model  # noqa: E402

needs_demo = pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(),
                                reason=f"embedded demo model missing at {MODEL_DIR}")


@pytest.mark.parametrize("version,keyword", [("4.44.2", "torch_dtype"), ("4.55.4", "torch_dtype"),
                                             ("4.56.0", "dtype"), ("5.24.0", "dtype"), ("5.25.0", "dtype"), ("5.0.0.dev0", "dtype"),
                                             ("unknown", "dtype")])
def test_dtype_keyword_follows_the_transformers_version(version, keyword):
    assert _dtype_keyword(version) == keyword


@needs_demo
@pytest.mark.parametrize("dtype,want", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_load_model_gives_the_requested_dtype(dtype, want):
    model, _ = load_model(str(MODEL_DIR), device="cpu", dtype=dtype, progress=False)
    assert {p.dtype for p in model.parameters()} == {want}
    assert not model.training


@needs_demo
def test_demo_folder_loads_with_its_chat_template():
    _, tok = load_model(str(MODEL_DIR), device="cpu", dtype="float32", progress=False)
    assert tok.chat_template, "the chat template (chat_template.jinja) must be loaded on every transformers"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<user>" in text and "<assistant>" in text
    assert tok.pad_token is not None
    # The folder was saved by transformers 5 (its added special tokens as a list): on every
    # version they stay single special tokens that decoding can skip.
    ids = tok("<user>hi<assistant>", add_special_tokens=False)["input_ids"]
    assert {tok.convert_tokens_to_ids("<user>"), tok.convert_tokens_to_ids("<assistant>")} <= set(ids)
    assert {"<user>", "<assistant>"} <= set(tok.all_special_tokens)
    assert "<user>" not in tok.decode(ids, skip_special_tokens=True)
