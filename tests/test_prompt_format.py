"""Prompt formats (chat / plain / raw / auto): what the model sees, the response span, and the
artifact field that makes generation and evaluation format prompts as fitting did."""
from __future__ import annotations

import json

import pytest
import torch

from tests.hf_tiny import tiny_model, tiny_tokenizer

from finesteer.artifact import ArtifactError, METADATA_KEY, read_metadata
from finesteer.extract import (PLAIN_TEMPLATE, encode_prompts, format_prompt, last_token_states,
                               resolve_prompt_format, response_deltas)

ATOL = 2e-5


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=3)  # layer 1 is then not the last (final-norm) entry


def test_resolution():
    chat, bare = tiny_tokenizer(), tiny_tokenizer(chat_template=False)
    assert resolve_prompt_format(chat, "auto") == "chat"
    assert resolve_prompt_format(bare, "auto") == "plain"
    assert resolve_prompt_format(bare) == "plain"            # default: the chat template where there is one
    assert resolve_prompt_format(bare, chat_template=False) == "raw"  # the older switch still means raw text
    assert resolve_prompt_format(chat, "plain") == "plain"
    with pytest.raises(ValueError, match="no chat template"):
        resolve_prompt_format(bare, "chat")
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        resolve_prompt_format(chat, "markdown")


def test_plain_text_and_tokens():
    tok = tiny_tokenizer(chat_template=False)
    assert PLAIN_TEMPLATE == "User: {prompt}\nAssistant:"
    assert format_prompt(tok, "Hi", prompt_format="plain") == "User: Hi\nAssistant:"
    assert format_prompt(tok, "Hi", prompt_format="raw") == "Hi"
    # plain text is tokenized with the tokenizer's special tokens, like raw text; the chat
    # template renders its own
    ids = encode_prompts(tok, ["Hi"], prompt_format="plain")[0]
    assert ids == tok("User: Hi\nAssistant:")["input_ids"]
    chat = tiny_tokenizer()
    assert encode_prompts(chat, ["Hi"], prompt_format="chat")[0] == \
        chat(format_prompt(chat, "Hi"), add_special_tokens=False)["input_ids"]


def _hidden(model, ids, layer):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]


def test_plain_states_and_deltas_match_hand_computed(llama):
    tok = tiny_tokenizer()  # has a template: "plain" must override it
    prompts, chosen, rejected = ["How do I pick a lock?", "Hi"], ["I can't help.", "Hello!"], ["Sure, first", "No."]
    q, d = response_deltas(llama, tok, prompts, chosen, rejected, [1], prompt_format="plain", progress=False)
    for i, p in enumerate(prompts):
        head = f"User: {p}\nAssistant: "
        torch.testing.assert_close(q[1][i], _hidden(llama, tok(head.rstrip())["input_ids"], 1)[-1], atol=ATOL,
                                   rtol=1e-5)

        def mean_resp(r):
            ids = tok(head + r)["input_ids"]
            return _hidden(llama, ids, 1)[len(tok(head)["input_ids"]):].mean(0)
        torch.testing.assert_close(d[1][i], mean_resp(chosen[i]) - mean_resp(rejected[i]), atol=ATOL, rtol=1e-5)
    states = last_token_states(llama, tok, prompts, [1], prompt_format="plain", progress=False)
    torch.testing.assert_close(states[1], q[1])
    chat = last_token_states(llama, tok, prompts, [1], prompt_format="chat", progress=False)
    assert not torch.allclose(chat[1], q[1])


def test_artifact_records_the_prompt_format(tmp_path):
    from .test_fit_artifact import fit_steerer

    st = fit_steerer(0)
    st.metadata["prompt_format"] = "plain"
    path = tmp_path / "s.safetensors"
    st.save(path)
    meta = read_metadata(path)
    assert meta["prompt_format"] == "plain" and "prompt_format" not in meta["extra"]
    assert type(st).load(path).metadata["prompt_format"] == "plain"

    # an unknown format is refused with the file and the field named
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["prompt_format"] = "markdown"
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(ArtifactError, match="prompt_format"):
        type(st).load(bad)


def test_cli_fit_records_the_format_and_generate_reuses_it(tmp_path):
    from tests.hf_tiny import save_tiny

    from finesteer import Steerer
    from finesteer.cli import main

    save_tiny(tmp_path / "model")
    words = "lock bread cat dog safe key door code".split()

    def jsonl(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    pairs = jsonl("pairs.jsonl", [{"prompt": f"How do I {words[i % 8]} {words[(3 * i) % 8]}?", "chosen": "No.",
                                   "rejected": f"Sure, {words[(5 * i) % 8]}."} for i in range(24)])
    target = jsonl("t.jsonl", [{"prompt": f"steal a {words[i % 8]} {words[(i + 3) % 8]}"} for i in range(20)])
    benign = jsonl("b.jsonl", [{"prompt": f"the {words[i % 8]} is {words[(i + 5) % 8]}"} for i in range(20)])
    prompts = jsonl("p.jsonl", [{"prompt": "steal a cat"}, {"prompt": "the sun is nice"}])
    art = tmp_path / "s.safetensors"
    small = ["--rank", "2", "--k-min", "2", "--k-max", "3", "--residual-dim", "2", "--hidden", "8", "--epochs", "2",
             "--quiet"]
    assert main(["fit", "--model", str(tmp_path / "model"), "--layer", "1", "--pairs", pairs, "--target", target,
                 "--benign", benign, "-o", str(art), "--prompt-format", "plain", *small]) == 0
    assert Steerer.load(art).metadata["prompt_format"] == "plain"
    assert read_metadata(art)["prompt_format"] == "plain"

    def generate(*extra):
        out = tmp_path / "g.jsonl"
        assert main(["generate", "--model", str(tmp_path / "model"), "--steerer", str(art), "--prompts", prompts,
                     "--max-new-tokens", "5", "-o", str(out), "--quiet", *extra]) == 0
        return [json.loads(line)["base"] for line in out.read_text().splitlines()]

    recorded = generate()
    assert recorded == generate("--prompt-format", "plain")
    assert recorded != generate("--prompt-format", "chat")
