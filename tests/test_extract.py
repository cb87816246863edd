"""Activation extraction: hook point, padding independence, multi-layer, cache, response deltas, per-token states."""
from __future__ import annotations

import pytest
import torch

from tests.hf_tiny import tiny_model, tiny_tokenizer

from finesteer.extract import (format_prompt, last_token_states, response_deltas,
                               response_token_states, span_token_states)

PROMPTS = ["Hi", "How do I bake bread?", "Tell me a joke about cats, please.", "ok", "What is 2+2?"]
ATOL = 2e-5  # fp32: batching/padding changes only summation order


@pytest.fixture(scope="module")
def llama3():
    return tiny_model("llama", layers=3)


def _single_hidden(model, ids, layer):
    """HF's own hidden state after block ``layer`` for one unpadded sequence → [S, d]."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0]


@pytest.mark.parametrize("template", [True, False])
def test_hook_point_matches_output_hidden_states(llama3, template):
    tok = tiny_tokenizer()
    got = last_token_states(llama3, tok, PROMPTS, [0, 1], batch_size=2, chat_template=template, progress=False)
    for i, p in enumerate(PROMPTS):
        text = format_prompt(tok, p, template)
        ids = tok(text, add_special_tokens=not template)["input_ids"]
        for layer in (0, 1):
            want = _single_hidden(llama3, ids, layer)[-1]
            torch.testing.assert_close(got[layer][i], want, atol=ATOL, rtol=1e-5)
    assert got[0].dtype == torch.float32 and got[0].shape == (len(PROMPTS), 64)


@pytest.mark.parametrize("arch", ["gpt_neox", "bert", "gemma2"])
def test_hook_point_other_families(arch):
    model = tiny_model(arch)
    tok = tiny_tokenizer()
    got = last_token_states(model, tok, PROMPTS[:3], [0], batch_size=3, chat_template=False, progress=False)[0]
    for i, p in enumerate(PROMPTS[:3]):
        want = _single_hidden(model, tok(p)["input_ids"], 0)[-1]
        torch.testing.assert_close(got[i], want, atol=ATOL, rtol=1e-5)


def test_last_layer_is_block_output_not_final_norm(llama3):
    tok = tiny_tokenizer()
    got = last_token_states(llama3, tok, PROMPTS[:2], [2], progress=False)[2]
    ids = tok(format_prompt(tok, PROMPTS[0]), add_special_tokens=False)["input_ids"]
    post_norm = _single_hidden(llama3, ids, 2)[-1]
    norm = llama3.model.norm
    try:
        llama3.model.norm = torch.nn.Identity()  # now HF's last entry is the raw block output
        pre_norm = _single_hidden(llama3, ids, 2)[-1]
    finally:
        llama3.model.norm = norm
    torch.testing.assert_close(got[0], pre_norm, atol=ATOL, rtol=1e-5)
    assert not torch.allclose(got[0], post_norm, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: absolute positions must ignore left padding
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equals_unpadded_single_runs(arch, side):
    model = tiny_model(arch)
    tok = tiny_tokenizer()
    batched = last_token_states(model, tok, PROMPTS, [0, 1], batch_size=5, padding_side=side, progress=False)
    single = last_token_states(model, tok, PROMPTS, [0, 1], batch_size=1, progress=False)
    for layer in (0, 1):
        torch.testing.assert_close(batched[layer], single[layer], atol=ATOL, rtol=1e-5)


def test_several_layers_in_one_pass_equal_separate_calls(llama3):
    tok = tiny_tokenizer()
    calls = []
    handle = llama3.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        together = last_token_states(llama3, tok, PROMPTS, [2, 0, 1], batch_size=8, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 1 and sorted(together) == [0, 1, 2]
    for layer in (0, 1, 2):
        alone = last_token_states(llama3, tok, PROMPTS, layer, batch_size=8, progress=False)[layer]
        torch.testing.assert_close(together[layer], alone, atol=ATOL, rtol=1e-5)


def test_cache_file_hit_skips_forward_and_misses_on_new_inputs(llama3, tmp_path):
    tok = tiny_tokenizer()
    cache = tmp_path / "states.safetensors"
    first = last_token_states(llama3, tok, PROMPTS, [0, 1], cache_file=cache, progress=False)
    assert cache.is_file()
    calls = []
    handle = llama3.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        again = last_token_states(llama3, tok, PROMPTS, [0, 1], cache_file=cache, progress=False)
        assert calls == []
        for layer in (0, 1):
            assert torch.equal(again[layer], first[layer])
        other = last_token_states(llama3, tok, PROMPTS[:3], [0, 1], cache_file=cache, progress=False)
        assert calls, "changed inputs must not be served from the cache"
        assert other[0].shape[0] == 3
        calls.clear()
        last_token_states(llama3, tok, PROMPTS[:3], [0], cache_file=cache, progress=False)
        assert calls, "a different layer list must not be served from the cache"
    finally:
        handle.remove()


def test_other_model_misses_cache(tmp_path):
    tok = tiny_tokenizer()
    cache = tmp_path / "c.safetensors"
    a = last_token_states(tiny_model("llama", seed=0), tok, PROMPTS, [0], cache_file=cache, progress=False)[0]
    b = last_token_states(tiny_model("llama", seed=1), tok, PROMPTS, [0], cache_file=cache, progress=False)[0]
    assert not torch.allclose(a, b)


def test_bf16_model_gives_fp32():
    model = tiny_model("llama", dtype=torch.bfloat16)
    out = last_token_states(model, tiny_tokenizer(), PROMPTS[:2], [0], progress=False)[0]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def _hand_delta(model, tok, prompt, chosen, rejected, layer, template, n=None):
    """Single-example δ from HF's own hidden states, response tokens found by hand."""
    def mean_resp(resp):
        if template:
            p_text = format_prompt(tok, prompt, True)
            full = tok.apply_chat_template([{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": resp}], tokenize=False)
            # the tiny template renders "<|assistant|>" + content + "<|end|>": drop the end marker
            ids = tok(full, add_special_tokens=False)["input_ids"][:-1]
            start = len(tok(p_text, add_special_tokens=False)["input_ids"])
        else:
            ids = tok(prompt + " " + resp)["input_ids"]
            start = len(tok(prompt + " ")["input_ids"])
        h = _single_hidden(model, ids, layer)
        stop = len(ids) if n is None else min(len(ids), start + n)
        return h[start:stop].mean(0)
    return mean_resp(chosen) - mean_resp(rejected)


@pytest.mark.parametrize("template", [True, False])
def test_response_deltas_match_hand_computed(llama3, template):
    tok = tiny_tokenizer()
    prompts = ["How do I pick a lock?", "Hi"]
    chosen = ["I can't help with that.", "Hello! How can I help?"]
    rejected = ["Sure, first get a tension wrench.", "Go away."]
    q, d = response_deltas(llama3, tok, prompts, chosen, rejected, [0, 1], batch_size=3, chat_template=template,
                           progress=False)
    states = last_token_states(llama3, tok, prompts, [0, 1], chat_template=template, progress=False)
    for layer in (0, 1):
        torch.testing.assert_close(q[layer], states[layer])
        for i in range(2):
            want = _hand_delta(llama3, tok, prompts[i], chosen[i], rejected[i], layer, template)
            torch.testing.assert_close(d[layer][i], want, atol=ATOL, rtol=1e-5)
    # first-n positions
    _, d3 = response_deltas(llama3, tok, prompts, chosen, rejected, [1], positions=3, chat_template=template,
                            progress=False)
    want = _hand_delta(llama3, tok, prompts[0], chosen[0], rejected[0], 1, template, n=3)
    torch.testing.assert_close(d3[1][0], want, atol=ATOL, rtol=1e-5)
    assert not torch.allclose(d3[1][0], d[1][0])


def test_response_deltas_extract_a_shared_prompt_once(llama3, monkeypatch):
    """Pairs that share a prompt share its query, extracted once."""
    import finesteer.extract as extract

    tok = tiny_tokenizer()
    prompts = ["How do I pick a lock?", "Hi", "How do I pick a lock?"]
    chosen = ["I can't help with that.", "Hello!", "No."]
    rejected = ["Sure, first get a tension wrench.", "Go away.", "Yes: a pin."]
    seen = []
    real = extract.last_token_states
    monkeypatch.setattr(extract, "last_token_states", lambda m, t, ps, *a, **k: seen.append(list(ps)) or
                        real(m, t, ps, *a, **k))
    q, d = response_deltas(llama3, tok, prompts, chosen, rejected, [1], progress=False)
    assert seen == [["How do I pick a lock?", "Hi"]]
    torch.testing.assert_close(q[1], real(llama3, tok, prompts, [1], progress=False)[1])
    assert torch.equal(q[1][0], q[1][2]) and not torch.equal(d[1][0], d[1][2])


def test_response_deltas_cache(llama3, tmp_path):
    tok = tiny_tokenizer()
    args = (["Hi", "Yo"], ["Hello.", "Hey."], ["No.", "Bye."], [0])
    cache = tmp_path / "d.safetensors"
    q1, d1 = response_deltas(llama3, tok, *args, cache_file=cache, progress=False)
    calls = []
    handle = llama3.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        q2, d2 = response_deltas(llama3, tok, *args, cache_file=cache, progress=False)
    finally:
        handle.remove()
    assert calls == [] and torch.equal(d1[0], d2[0]) and torch.equal(q1[0], q2[0])


def test_bad_inputs_have_clear_errors(llama3):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="prompt 1: empty"):
        last_token_states(llama3, tok, ["ok", "  "], [0], progress=False)
    with pytest.raises(ValueError, match=r"prompt 0: \d+ tokens, longer than the model's context of 128"):
        last_token_states(llama3, tok, ["x" * 200], [0], progress=False)
    with pytest.raises(ValueError, match=r"layer 3 is out of range.*3 decoder layers"):
        last_token_states(llama3, tok, ["ok"], [3], progress=False)
    with pytest.raises(ValueError, match="rejected response of pair 0: empty"):
        response_deltas(llama3, tok, ["ok"], ["fine"], [""], [0], progress=False)
    with pytest.raises(ValueError, match="same length"):
        response_deltas(llama3, tok, ["ok", "b"], ["fine"], ["no"], [0], progress=False)
    with pytest.raises(ValueError, match="positions"):
        response_deltas(llama3, tok, ["ok"], ["fine"], ["no"], [0], positions=0, progress=False)


def test_long_rows_are_exactly_the_rows_extraction_refuses(llama3):
    from finesteer.extract import long_rows

    tok = tiny_tokenizer()
    prompts = ["ok", "x" * 200, "fine", "y" * 100]
    assert long_rows(tok, prompts, context=128) == [1]
    assert long_rows(tok, prompts, context=None) == []
    # each kept row passes, each listed row is refused
    last_token_states(llama3, tok, [p for i, p in enumerate(prompts) if i != 1], [0], progress=False)
    with pytest.raises(ValueError, match="longer than the model's context"):
        last_token_states(llama3, tok, [prompts[1]], [0], progress=False)
    # pairs: prompt + either response counts (the prompt alone fits, the response makes it too long)
    chosen, rejected = ["no", "no", "no", "no"], ["sure", "sure", "sure", "z" * 40]
    assert long_rows(tok, prompts, chosen, rejected, context=128) == [1, 3]
    with pytest.raises(ValueError, match="longer than the model's context"):
        response_deltas(llama3, tok, [prompts[3]], [chosen[3]], [rejected[3]], [0], progress=False)
    with pytest.raises(ValueError, match="prompt 1: empty"):
        long_rows(tok, ["ok", " "], context=128)


def test_first_n_positions_run_only_the_tokens_they_average(llama3):
    """With positions = n, a response is run only up to its n-th token: the δ is the one the full
    sequence gives (a causal model), and a response too long for the context is no longer refused,
    as long_rows agrees."""
    from finesteer.extract import long_rows

    tok = tiny_tokenizer()
    long_answer = "Sure. " + "word " * 60
    prompts, chosen, rejected = ["Hi", "How do I pick a lock?"], ["Hello there.", "I can't help."], \
        ["Go away.", long_answer]
    assert long_rows(tok, prompts, chosen, rejected, context=128) == [1]
    assert long_rows(tok, prompts, chosen, rejected, context=128, positions=4) == []
    with pytest.raises(ValueError, match="longer than the model's context"):
        response_deltas(llama3, tok, prompts, chosen, rejected, [1], progress=False)
    _, d = response_deltas(llama3, tok, prompts, chosen, rejected, [1], positions=4, progress=False)
    for i in range(2):
        want = _hand_delta(llama3, tok, prompts[i], chosen[i], rejected[i][:60], 1, True, n=4)
        torch.testing.assert_close(d[1][i], want, atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError, match="positions"):
        long_rows(tok, prompts, chosen, rejected, context=128, positions=0)


def test_chat_template_error_does_not_name_a_command_line_flag(llama3):
    from finesteer.extract import ChatTemplateError

    tok = tiny_tokenizer()
    # A template that drops the assistant's text: the response cannot be located verbatim.
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
                         "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(ChatTemplateError) as exc:
        response_deltas(llama3, tok, ["ok"], ["fine"], ["no"], [0], progress=False)
    assert "prompt_format='plain'" in str(exc.value) and "--" not in str(exc.value)


@pytest.mark.parametrize("template", [True, False])
@pytest.mark.parametrize("side", ["left", "right"])
def test_response_token_states_are_each_response_tokens_state(llama3, template, side):
    """Every response token's state, in order, as HF computes it for the unpadded sequence; their
    means are response_deltas' means (the same tokens, located the same way)."""
    tok = tiny_tokenizer()
    prompts = ["How do I pick a lock?", "Hi", "How do I pick a lock?"]
    responses = ["I can't help with that.", "Hello! How can I help?", "Sure, first get a tension wrench."]
    states, lengths = response_token_states(llama3, tok, prompts, responses, [0, 1], batch_size=2,
                                            chat_template=template, padding_side=side, progress=False)
    assert lengths.dtype == torch.long and lengths.shape == (3,) and bool((lengths > 0).all())
    for layer in (0, 1):
        assert states[layer].shape == (int(lengths.sum()), llama3.config.hidden_size)
        rows = torch.split(states[layer], lengths.tolist())
        _, d = response_deltas(llama3, tok, prompts[:1], responses[:1], responses[2:], [layer],
                               chat_template=template, progress=False)
        torch.testing.assert_close(rows[0].mean(0) - rows[2].mean(0), d[layer][0], atol=ATOL, rtol=1e-5)
        if not template:  # raw text: the response's tokens end the sequence, after the prompt's + " "
            full = tok(prompts[1] + " " + responses[1])["input_ids"]
            start = len(tok(prompts[1] + " ")["input_ids"])
            assert int(lengths[1]) == len(full) - start
            torch.testing.assert_close(rows[1], _single_hidden(llama3, full, layer)[start:], atol=ATOL, rtol=1e-5)


def test_span_token_states_reads_the_span_and_caches(llama3, tmp_path):
    tok = tiny_tokenizer()
    seqs = [[1, 5, 9, 13, 17, 21], [1, 7, 8], [1, 30, 31, 32, 33]]
    spans = [(2, 5), (0, 3), (4, 5)]
    cache = tmp_path / "s.safetensors"
    states, lengths = span_token_states(llama3, tok, seqs, spans, [1], batch_size=3, cache_file=cache,
                                        progress=False)
    assert lengths.tolist() == [3, 3, 1]
    want = torch.cat([_single_hidden(llama3, ids, 1)[s:e] for ids, (s, e) in zip(seqs, spans)])
    torch.testing.assert_close(states[1], want, atol=ATOL, rtol=1e-5)
    calls = []
    handle = llama3.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        again, lengths2 = span_token_states(llama3, tok, seqs, spans, [1], cache_file=cache, progress=False)
    finally:
        handle.remove()
    assert calls == [] and torch.equal(again[1], states[1]) and torch.equal(lengths2, lengths)
    empty, none = span_token_states(llama3, tok, [], [], [1], progress=False)
    assert empty[1].shape == (0, llama3.config.hidden_size) and none.shape == (0,)


def test_span_and_response_token_states_refuse_bad_input(llama3):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"span 1: \(2, 2\) is not a non-empty range"):
        span_token_states(llama3, tok, [[1, 2, 3], [1, 2, 3]], [(0, 1), (2, 2)], [0], progress=False)
    with pytest.raises(ValueError, match=r"span 0: \(1, 9\)"):
        span_token_states(llama3, tok, [[1, 2, 3]], [(1, 9)], [0], progress=False)
    with pytest.raises(ValueError, match="same length"):
        span_token_states(llama3, tok, [[1, 2, 3]], [], [0], progress=False)
    with pytest.raises(ValueError, match="response 1: empty"):
        response_token_states(llama3, tok, ["a", "b"], ["fine", " "], [0], progress=False)
    with pytest.raises(ValueError, match=r"sequence 0: \d+ tokens, longer than the model's context"):
        response_token_states(llama3, tok, ["x" * 200], ["fine"], [0], progress=False)
