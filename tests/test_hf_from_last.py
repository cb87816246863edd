"""``FusedSteerer(mode="prompt", prompt_positions="from_last")`` against its definition.

Definition (no KV cache, no FusedSteerer): at every generation step the whole sequence (prompt
plus the tokens generated so far) is run again with a forward hook on layer ℓ that computes
``v = λ·g(h[p−1])·s(h[p−1])`` from the **original** prompt's last token ``p − 1`` and adds it
at every position ``t ≥ p − 1`` (:func:`generate_from_last_definition`). The prompt before its
last token is therefore exactly unsteered, and the vector is fixed for the whole request. The
vLLM plugin's prompt mode is compared against the same function (tests/test_vllm.py).
"""
from __future__ import annotations

import pytest
import torch

from finesteer import FusedSteerer
from finesteer.reference import add_vectors, steering_vectors
from tests.hf_tiny import tiny_model
from tests.utils import random_steerer


def generate_from_last_definition(model, steerer, prompt, new_tokens: int, bank_index: int = 0,
                                  with_logprobs: bool = False):
    """Greedy tokens for one ``prompt`` (list of ids) under "from the last prompt token" prompt mode.

    ``steerer``: a :class:`~finesteer.Steerer`, or a list of them (a bank at one layer, entry
    ``bank_index`` chosen; −1 = unsteered). Uses :mod:`finesteer.reference` only. With
    ``with_logprobs``, returns ``(tokens, logprobs)``: each chosen token's log-probability.
    """
    steerers = steerer if isinstance(steerer, (list, tuple)) else [steerer]
    layer = steerers[0].layer
    from finesteer.bank import SteeringBank
    bank = SteeringBank.from_steerers(steerers)
    last = len(prompt) - 1
    index = torch.tensor([bank_index])

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h2 = h[0]
        v = steering_vectors(h2[last:last + 1], bank, index)                  # [1, d] fp32
        slot = (torch.arange(h2.shape[0]) >= last).to(torch.int32) - 1       # −1 before, 0 from last on
        out = add_vectors(h2, v, slot)[None]
        return (out, *output[1:]) if isinstance(output, tuple) else out

    handle = model.model.layers[layer].register_forward_hook(hook)
    ids = torch.tensor([prompt])
    logprobs = []
    try:
        with torch.no_grad():
            for _ in range(new_tokens):
                logits = model(ids, use_cache=False).logits[0, -1].float()
                nxt = logits.argmax()
                logprobs.append(float(torch.log_softmax(logits, -1)[nxt]))
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    finally:
        handle.remove()
    tokens = ids[0, len(prompt):].tolist()
    return (tokens, logprobs) if with_logprobs else tokens


def _fused_generate(model, steerers, prompts, new_tokens, index, prompt_positions="from_last"):
    """Greedy ``model.generate`` (KV cache) with FusedSteerer attached; one prompt at a time."""
    out = []
    with FusedSteerer.attach(model, steerers, mode="prompt", backend="reference",
                             prompt_positions=prompt_positions) as fs:
        for prompt, i in zip(prompts, index):
            fs.set_index([i])
            ids = torch.tensor([prompt])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False)
            out.append(gen[0, len(prompt):].tolist())
    return out


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama", seed=1, layers=3)
    m.generation_config.eos_token_id = None  # always generate new_tokens tokens, like the definition
    return m


def _steerers(d=64, layer=1):
    # Gate off and a large strength: every prompt is steered and the tokens must change.
    return [random_steerer(d, layer=layer, seed=s, gate_mode=None, with_gate=False, strength=6.0) for s in (1, 2)]


def test_from_last_generate_equals_definition(model):
    steerers = _steerers()
    prompts = [[1, 20, 33, 41, 9, 12, 50], [1, 7, 8], [1, 60, 22, 23, 24, 25, 26, 27, 28]]
    index = [0, 1, -1]
    got = _fused_generate(model, steerers, prompts, 8, index)
    want = [generate_from_last_definition(model, steerers, p, 8, i) for p, i in zip(prompts, index)]
    assert got == want
    plain = [generate_from_last_definition(model, steerers, p, 8, -1) for p in prompts]
    assert got[0] != plain[0] and got[1] != plain[1], "the steerers must change the generation"
    assert got[2] == plain[2], "bank index −1 leaves the request unsteered"
    # "all" (DESIGN §4) also steers the prompt before its last token: the prefill differs.
    ids = torch.tensor(prompts[:1])
    logits = {}
    with torch.no_grad():
        for positions in ("all", "from_last"):
            with FusedSteerer.attach(model, steerers, mode="prompt", backend="reference", index=[0],
                                     prompt_positions=positions):
                logits[positions] = model(ids).logits
    assert not torch.equal(logits["all"][0, -1], logits["from_last"][0, -1])


def test_from_last_leaves_the_prompt_before_its_last_token_unsteered(model):
    """Left-padded batch: every position before each row's last real token is bit-identical to
    the unsteered model, in the stream after the steered layer and in the logits (causal
    attention); the last token's stream is h + v with v from that same row."""
    steerers = _steerers()
    ids = torch.tensor([[0, 0, 1, 20, 33, 41], [1, 7, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    seen = []
    # The input of layer 2 is the stream after layer 1 (the steered layer), as steered.
    handle = model.model.layers[2].register_forward_pre_hook(lambda m, a, kw: seen.append(
        (a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            plain = model(ids, attention_mask=mask).logits
            with FusedSteerer.attach(model, steerers, mode="prompt", backend="reference",
                                     prompt_positions="from_last", index=[1, 0]):
                steered = model(ids, attention_mask=mask).logits
    finally:
        handle.remove()
    h_plain, h_steered = seen
    assert torch.equal(h_plain[:, :5], h_steered[:, :5])
    # Logits are compared at real tokens only: transformers 4.x lets fully padded query rows attend
    # to every position (SDPA's unmask-unattended workaround), so padding rows see the last token.
    real_before_last = mask.bool() & (torch.arange(6) < 5)
    assert torch.equal(plain[real_before_last], steered[real_before_last])
    from finesteer.bank import SteeringBank
    bank = SteeringBank.from_steerers(steerers)
    h_last = h_plain[:, 5]
    expected = add_vectors(h_last, steering_vectors(h_last, bank, torch.tensor([1, 0])), None)
    assert torch.equal(h_steered[:, 5], expected)
    assert not torch.equal(h_steered[:, 5], h_last)


def test_from_last_options_are_checked(model):
    st = _steerers()[:1]
    with pytest.raises(ValueError, match="prompt_positions must be one of"):
        FusedSteerer.attach(model, st, mode="prompt", prompt_positions="first")
    with pytest.raises(ValueError, match="applies to prompt mode only"):
        FusedSteerer.attach(model, st, mode="token", prompt_positions="from_last")
    # Nothing was left attached by the failed calls.
    FusedSteerer.attach(model, st, mode="prompt", backend="reference", prompt_positions="from_last").detach()
