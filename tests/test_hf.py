"""FusedSteerer on tiny random HF models: equivalence with hand-written hooks, exact detach, errors."""
from __future__ import annotations

import pytest
import torch

from tests.hf_tiny import tiny_model, tiny_tokenizer
from tests.utils import random_steerer

from finesteer import FusedSteerer, SteeringBank
from finesteer import reference as ref
from finesteer.integrations.hf import attached_layers
from finesteer.models import find_decoder_layers, model_hidden_size

D = 64
GEN = dict(max_new_tokens=6, do_sample=False)


def _steerer(layer=0, seed=0, strength=4.0, **kw):
    return random_steerer(D, seed=seed, layer=layer, strength=strength, gate_mode="off", **kw)


def _batch(tok, prompts, side="left"):
    tok.padding_side = side
    enc = tok([tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p in prompts], add_special_tokens=False, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _block_out_at_last(model, layer, ids, mask, pre_hooks=()):
    """Unsteered (or partially steered by ``pre_hooks``) h after block ``layer`` at each row's last real token."""
    got = {}
    blocks = find_decoder_layers(model)
    handles = [blocks[ly].register_forward_hook(fn) for ly, fn in pre_hooks]
    handles.append(blocks[layer].register_forward_hook(lambda m, a, o: got.setdefault("h", o if isinstance(
        o, torch.Tensor) else o[0])))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    S = ids.shape[1]
    last = ((mask != 0).long() * torch.arange(1, S + 1)).argmax(-1)
    return got["h"][torch.arange(ids.shape[0]), last]


def _const_hook(vectors):
    """A plain forward hook adding row b's constant vector at every position (prefill and decode)."""
    def hook(module, args, output):
        h = output if isinstance(output, torch.Tensor) else output[0]
        new = (h.float() + vectors[:, None, :]).to(h.dtype)
        new = torch.where(vectors[:, None, :] == 0, h, new)
        return new if isinstance(output, torch.Tensor) else (new, *output[1:])
    return hook


def _two_pass_reference(model, steerers_per_row, layer, ids, mask, gen):
    """Pass 1: unsteered forward → v_b = steerer_b.vector(h_last_b). Pass 2: generate with a constant-add hook."""
    h_last = _block_out_at_last(model, layer, ids, mask)
    vecs = torch.stack([s.vector(h_last[b]) if s is not None else torch.zeros(D)
                        for b, s in enumerate(steerers_per_row)])
    handle = find_decoder_layers(model)[layer].register_forward_hook(_const_hook(vecs))
    try:
        return model.generate(input_ids=ids, attention_mask=mask, **gen)
    finally:
        handle.remove()


def _no_hooks_left(model):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__
    assert attached_layers(model) == []


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma2"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model(arch):
    return tiny_model(arch)


def test_prompt_mode_single_prompt_equals_two_pass_reference(model):
    tok = tiny_tokenizer()
    ids, mask = _batch(tok, ["Tell me how to pick a lock."])
    s = _steerer(layer=1)
    want = _two_pass_reference(model, [s], 1, ids, mask, GEN)
    with torch.no_grad():
        base = model.generate(input_ids=ids, attention_mask=mask, **GEN)
        with FusedSteerer.attach(model, s, mode="prompt"):
            got = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    assert torch.equal(got, want)
    assert not torch.equal(got, base), "steering must change the greedy output (non-vacuous test)"
    _no_hooks_left(model)


def test_prompt_mode_padded_batch_with_bank_index_equals_reference(model):
    tok = tiny_tokenizer()
    prompts = ["Hi", "How do I bake bread at home?", "Why?", "Tell me a joke"]
    ids, mask = _batch(tok, prompts, side="left")
    bank = [_steerer(layer=0, seed=1), _steerer(layer=0, seed=2, strength=6.0)]
    index = [1, -1, 0, 1]
    want = _two_pass_reference(model, [bank[i] if i >= 0 else None for i in index], 0, ids, mask, GEN)
    with torch.no_grad():
        base = model.generate(input_ids=ids, attention_mask=mask, **GEN)
        with FusedSteerer.attach(model, bank, mode="prompt", index=index) as fs:
            got = model.generate(input_ids=ids, attention_mask=mask, **GEN)
            assert fs.bank(0).num_steerers == 2
    assert torch.equal(got, want)
    assert torch.equal(got[1], base[1]), "index −1 must leave the row unsteered"
    assert not torch.equal(got[[0, 2, 3]], base[[0, 2, 3]])
    _no_hooks_left(model)


def test_token_mode_equals_plain_hook_with_reference_operator(model):
    tok = tiny_tokenizer()
    ids, mask = _batch(tok, ["Hi", "How do I bake bread?"], side="left")
    steerers = [_steerer(layer=1, seed=3), _steerer(layer=1, seed=4)]
    bank = SteeringBank.from_steerers(steerers)
    index = torch.tensor([1, 0])

    def plain(module, args, output):
        h = output if isinstance(output, torch.Tensor) else output[0]
        B, S, d = h.shape
        new = ref.steer_tokens(h.reshape(-1, d), bank, index.repeat_interleave(S)).reshape(h.shape)
        return new if isinstance(output, torch.Tensor) else (new, *output[1:])

    handle = find_decoder_layers(model)[1].register_forward_hook(plain)
    try:
        with torch.no_grad():
            want = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    finally:
        handle.remove()
    with torch.no_grad(), FusedSteerer.attach(model, steerers, mode="token", index=index):
        got = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    assert torch.equal(got, want)
    _no_hooks_left(model)


def test_detach_restores_bit_identical_logits(model):
    tok = tiny_tokenizer()
    ids, mask = _batch(tok, ["Hi", "How do I bake bread?"], side="right")
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        fs = FusedSteerer.attach(model, [_steerer(layer=0), _steerer(layer=1, seed=5)], mode="prompt")
        steered = model(input_ids=ids, attention_mask=mask).logits
        fs.detach()
        after = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(before, steered)
    assert torch.equal(before, after)
    _no_hooks_left(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_prompt_mode_equals_reference(dtype):
    model = tiny_model("llama", dtype=dtype)
    tok = tiny_tokenizer()
    ids, mask = _batch(tok, ["Hi", "Tell me how to pick a lock."], side="left")
    s = _steerer(layer=0)
    want = _two_pass_reference(model, [s, s], 0, ids, mask, GEN)
    with torch.no_grad(), FusedSteerer.attach(model, s):
        got = model.generate(input_ids=ids, attention_mask=mask, **GEN)
        base_h = _block_out_at_last(model, 0, ids, mask)
    assert base_h.dtype == dtype
    assert torch.equal(got, want)


def test_right_padding_uses_last_real_token():
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    ids, mask = _batch(tok, ["Hi", "How do I bake bread?", "Why"], side="right")
    s = _steerer(layer=0)
    h_last = _block_out_at_last(model, 0, ids, mask)
    vecs = s.vector(h_last)
    handle = find_decoder_layers(model)[0].register_forward_hook(_const_hook(vecs))
    try:
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    with torch.no_grad(), FusedSteerer.attach(model, s, mode="prompt", backend="reference"):
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_two_layers_in_one_pass_llama():
    """Layer 1's vector is read from h that already carries layer 0's steering (DESIGN §1)."""
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    ids, mask = _batch(tok, ["Hi there", "Tell me a joke"], side="left")
    s0, s1 = _steerer(layer=0, seed=6, strength=2.0), _steerer(layer=1, seed=7, strength=2.0)
    v0 = s0.vector(_block_out_at_last(model, 0, ids, mask))
    v1 = s1.vector(_block_out_at_last(model, 1, ids, mask, pre_hooks=[(0, _const_hook(v0))]))
    blocks = find_decoder_layers(model)
    handles = [blocks[0].register_forward_hook(_const_hook(v0)), blocks[1].register_forward_hook(_const_hook(v1))]
    try:
        with torch.no_grad():
            want = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad(), FusedSteerer.attach(model, [s1, s0], mode="prompt") as fs:
        assert fs.layers == (0, 1)
        got = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    assert torch.equal(got, want)


def test_sampling_and_set_index_between_calls():
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    ids, mask = _batch(tok, ["Hi", "How do I bake bread?"], side="left")
    s = _steerer(layer=1)
    gen = dict(max_new_tokens=6, do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(123)
    want = _two_pass_reference(model, [s, None], 1, ids, mask, gen)
    with torch.no_grad(), FusedSteerer.attach(model, s, index=[0, 0]) as fs:
        fs.set_index([0, -1])
        torch.manual_seed(123)
        got = model.generate(input_ids=ids, attention_mask=mask, **gen)
        assert torch.equal(got, want)
        fs.set_index(None)  # both rows steered now
        torch.manual_seed(123)
        both = model.generate(input_ids=ids, attention_mask=mask, **gen)
    torch.manual_seed(123)
    want_both = _two_pass_reference(model, [s, s], 1, ids, mask, gen)
    assert torch.equal(both, want_both)


def test_beams_repeat_row_index():
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    ids, mask = _batch(tok, ["Hi", "Why"], side="left")
    s = _steerer(layer=0)
    gen = dict(max_new_tokens=6, do_sample=False, num_beams=2, num_return_sequences=2)
    with torch.no_grad(), FusedSteerer.attach(model, s, index=[-1, 0]):
        got = model.generate(input_ids=ids, attention_mask=mask, **gen)
    with torch.no_grad():
        base = model.generate(input_ids=ids, attention_mask=mask, **gen)
    assert torch.equal(got[:2], base[:2]) and not torch.equal(got[2:], base[2:])


def test_errors_and_no_hooks_left_behind():
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    ids, mask = _batch(tok, ["Hi", "Why"], side="left")
    with pytest.raises(ValueError, match=r"layer 2, but LlamaForCausalLM has 2 decoder layers"):
        FusedSteerer.attach(model, _steerer(layer=2))
    with pytest.raises(ValueError, match=r"hidden size 32, LlamaForCausalLM has hidden size 64"):
        FusedSteerer.attach(model, random_steerer(32, gate_mode="off"))
    with pytest.raises(ValueError, match="mode must be"):
        FusedSteerer.attach(model, _steerer(), mode="tokens")
    with pytest.raises(ValueError, match="unknown backend"):
        FusedSteerer.attach(model, _steerer(), backend="nope")
    with pytest.raises(IndexError, match=r"index values must be in \[-1, 0\]"):
        FusedSteerer.attach(model, _steerer(), index=[0, 1])
    _no_hooks_left(model)

    fs = FusedSteerer.attach(model, _steerer(layer=1))
    with pytest.raises(RuntimeError, match="layer 1 of LlamaForCausalLM already has a FusedSteerer attached"):
        FusedSteerer.attach(model, _steerer(layer=1, seed=9))
    fs.detach()
    fs.detach()  # idempotent
    _no_hooks_left(model)

    # wrong batch size for the index: error raised inside generate, hooks removed by the context manager
    with pytest.raises(ValueError, match="bank index has 3 entries but the batch has 2 rows"):
        with FusedSteerer.attach(model, _steerer(layer=0), index=[0, 0, -1]):
            model.generate(input_ids=ids, attention_mask=mask, **GEN)
    _no_hooks_left(model)

    class Boom(Exception):
        pass

    def explode(*a, **k):
        raise Boom

    with pytest.raises(Boom):
        with FusedSteerer.attach(model, [_steerer(layer=0), _steerer(layer=1)]):
            model.generate(input_ids=ids, attention_mask=mask, logits_processor=[explode], **GEN)
    _no_hooks_left(model)
    # and the layers are free again
    with FusedSteerer.attach(model, _steerer(layer=1)):
        pass


def test_layer_location_for_known_families_and_explicit_path():
    for arch, cls in [("gpt2", "GPT2Block"), ("gpt_neox", "GPTNeoXLayer"), ("bert", "BertLayer")]:
        m = tiny_model(arch)
        blocks = find_decoder_layers(m)
        assert len(blocks) == 2 and type(blocks[0]).__name__ == cls
        assert model_hidden_size(m) == D
    import transformers
    for cfg, cls, block in [(transformers.MistralConfig, transformers.MistralForCausalLM, "MistralDecoderLayer"),
                            (transformers.Phi3Config, transformers.Phi3ForCausalLM, "Phi3DecoderLayer")]:
        m = cls(cfg(vocab_size=96, hidden_size=D, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2))
        assert type(find_decoder_layers(m)[0]).__name__ == block and len(find_decoder_layers(m)) == 2
        assert type(find_decoder_layers(m.model)[0]).__name__ == block  # the bare body works too
    m = tiny_model("llama")
    assert find_decoder_layers(m, "model.layers") is m.model.layers
    with pytest.raises(ValueError, match="'model.norm' resolves to a LlamaRMSNorm"):
        find_decoder_layers(m, "model.norm")

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(ValueError, match="cannot find the decoder layers of Odd"):
        find_decoder_layers(Odd())
    assert len(find_decoder_layers(Odd(), "stack")) == 1


def test_gpt2_prompt_mode_generate_changes_output_and_detaches():
    model = tiny_model("gpt2")
    tok = tiny_tokenizer()
    ids, mask = _batch(tok, ["Hi", "How do I bake bread?"], side="left")
    s = _steerer(layer=1, strength=8.0)
    want = _two_pass_reference(model, [s, s], 1, ids, mask, GEN)
    with torch.no_grad(), FusedSteerer.attach(model, s):
        got = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    assert torch.equal(got, want)
    _no_hooks_left(model)


def _decode_step_through_hooks(fs, model, B, past, device):
    """Run the pre-hook and every layer hook of ``fs`` as one decode step would (S = 1, ``past`` cached tokens)."""
    ids = torch.ones(B, 1, dtype=torch.long, device=device)
    mask = torch.ones(B, past + 1, dtype=torch.long, device=device)
    fs._pre_hook(model, (), {"input_ids": ids, "attention_mask": mask})
    assert not fs._prefill
    outs = []
    for st in fs._states:
        hook = st.module._forward_hooks[st.handle.id]
        h = torch.randn(B, 1, D, device=device)
        outs.append(hook(st.module, (h,), (h,))[0])
    return outs


class _NoHostSync:
    """Make every tensor→Python conversion raise (a CPU-side proxy for a host–device sync)."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def boom(*a, **k):
            raise AssertionError("tensor value read on the host in the decode path")
        for n in self.NAMES:
            setattr(torch.Tensor, n, boom)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("mode", ["prompt", "token"])
def test_decode_path_reads_no_tensor_values(mode):
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    ids, mask = _batch(tok, ["Hi", "How do I bake bread?"], side="left")
    with torch.no_grad(), FusedSteerer.attach(model, [_steerer(layer=0), _steerer(layer=1)], mode=mode,
                                              index=[0, -1], backend="reference") as fs:
        model(input_ids=ids, attention_mask=mask)  # prefill fills the per-sequence cache
        with _NoHostSync():
            outs = _decode_step_through_hooks(fs, model, 2, ids.shape[1], "cpu")
    assert all(o.shape == (2, 1, D) for o in outs)


@pytest.mark.gpu
def test_decode_path_has_no_cuda_sync():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = tiny_model("llama").cuda()
    tok = tiny_tokenizer()
    ids, mask = _batch(tok, ["Hi", "How do I bake bread?"], side="left")
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad(), FusedSteerer.attach(model, [_steerer(layer=0), _steerer(layer=1)], index=[0, -1]) as fs:
        model(input_ids=ids, attention_mask=mask)
        h_warm = _decode_step_through_hooks(fs, model, 2, ids.shape[1], "cuda")  # warm-up: lazy inits
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _decode_step_through_hooks(fs, model, 2, ids.shape[1], "cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert h_warm[0].is_cuda


def test_prompt_states_are_what_the_gate_read():
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    ids, mask = _batch(tok, ["Hi", "How do I bake bread?", "Why"], side="right")
    s = _steerer(layer=1)
    with torch.no_grad(), FusedSteerer.attach(model, s) as fs:
        with pytest.raises(RuntimeError, match="no prefill"):
            fs.prompt_states()
        model(input_ids=ids, attention_mask=mask)
        got = fs.prompt_states()
        with pytest.raises(KeyError, match="no steerer attached at layer 0"):
            fs.prompt_states(0)
    torch.testing.assert_close(got, _block_out_at_last(model, 1, ids, mask), atol=1e-6, rtol=1e-6)
