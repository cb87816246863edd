"""The vLLM plugin's parts that need no vLLM: configuration, names, step tables, the hook, the
start-up refusals and the prefix-cache key. Fast; the engine itself is tested in tests/test_vllm.py."""
from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch

from finesteer.integrations import vllm as fv
from finesteer.integrations.vllm_state import ScheduledRequest, StepTables
from finesteer.reference import add_vectors, steering_vectors
from finesteer.reference import steer_tokens as reference_steer_tokens
from tests.utils import random_steerer

D, LAYERS = 128, 2


# --------------------------------------------------------------------------------------------
# a fake vLLM model: layers take and return (hidden_states, residual)
# --------------------------------------------------------------------------------------------

class _FakeLayer(torch.nn.Module):
    """Like a vLLM decoder layer: first forms the stream ``x + residual`` (its fused add-norm),
    returns ``(block output, stream)``."""

    def __init__(self, d):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(d, d) * d ** -0.5)

    def forward(self, x, residual):
        stream = x if residual is None else x + residual
        return torch.tanh(stream) @ self.w, stream


class _FakeModel(torch.nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(_FakeLayer(d) for _ in range(n))

    def forward(self, x):
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual)
        return x + residual


def _stream_after(model, x, upto: int):
    """The unsteered stream after layer ``upto`` (``.forward`` bypasses hooks)."""
    with torch.no_grad():
        hs, res = x, None
        for layer in list(model.model.layers)[:upto + 1]:
            hs, res = layer.forward(hs, res)
    return hs + res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_hook_with_per_row_index_equals_reference_exactly(dtype):
    """(0, steer(hs + res)) with the tables' per-token index gives the next layer exactly DESIGN
    §4's output; rows of unsteered requests are bit-identical; detach restores the model."""
    torch.manual_seed(0)
    d, n = 48, 3
    model = _FakeModel(d, n).to(dtype)
    bank = [random_steerer(d, layer=1, seed=2), random_steerer(d, layer=1, seed=3)]
    x = torch.randn(37, d, dtype=dtype)
    captured = {}
    model.model.layers[2].register_forward_pre_hook(lambda m, a: captured.update(stream=a[0] + a[1]))
    plain = model(x)
    tables = fv.attach(model, bank, backend="reference", max_tokens=64, max_seqs=4)
    assert torch.equal(model(x), plain), "nothing is steered before the tables are filled"
    # Three requests: 10 tokens on steerer 1, 20 unsteered, 7 on steerer 0.
    tables.fill([ScheduledRequest("r0", 0, 10, 10, (1,)), ScheduledRequest("r1", 0, 20, 20, (-1,)),
                 ScheduledRequest("r2", 5, 7, 5, (0,))])
    steered = model(x)
    index = torch.tensor([1] * 10 + [-1] * 20 + [0] * 7)
    expected = reference_steer_tokens(_stream_after(model, x, 1), SteeringBankOf(bank), index)
    assert torch.equal(captured["stream"], expected)
    assert torch.equal(captured["stream"][10:30], _stream_after(model, x, 1)[10:30])
    assert not torch.equal(steered, plain)
    tables.reset()
    assert torch.equal(model(x), plain), "reset (dummy runs) steers nothing"
    fv.detach(model)
    assert torch.equal(model(x), plain)


def SteeringBankOf(steerers):  # noqa: N802 - reads like a constructor
    from finesteer.bank import SteeringBank
    return SteeringBank.from_steerers(steerers)


def test_prompt_hook_from_last_over_chunks_and_decode():
    """Prompt mode: a 9-token prompt in chunks of 5 and 4 (the second holds the last prompt
    token), then a decode step; the vector comes from the last prompt token's stream and is
    added from there on; another request in the batch is unsteered."""
    torch.manual_seed(1)
    d = 32
    model = _FakeModel(d, 2)
    st = random_steerer(d, layer=0, seed=4, gate_mode=None, with_gate=False)
    bank = SteeringBankOf([st])
    tables = fv.attach(model, [st], backend="reference", mode="prompt", max_tokens=16, max_seqs=2)
    seen = []
    model.model.layers[1].register_forward_pre_hook(lambda m, a: seen.append(a[0] + a[1]))
    full = torch.randn(10, d)             # the request's 9 prompt tokens and 1 generated
    other = torch.randn(3, d)             # an unsteered request sharing the steps

    tables.fill([ScheduledRequest("r", 0, 5, 9, (0,)), ScheduledRequest("o", 0, 3, 3, (-1,))])
    model(torch.cat([full[:5], other]))
    assert torch.equal(seen[-1], _stream_after(model, torch.cat([full[:5], other]), 0)), "chunk 1: unsteered"

    tables.fill([ScheduledRequest("r", 5, 4, 9, (0,))])
    model(full[5:9])
    h = _stream_after(model, full[5:9], 0)
    # The hook computes the selection rows [last token, padding → row 0] in one call, so the
    # expected vector comes from the same [2, d] call (a GEMM's rounding depends on its shape).
    v = steering_vectors(h[[3, 0]], bank, torch.tensor([0, -1]))[:1]
    assert torch.equal(seen[-1][:3], h[:3]), "prompt tokens before the last one stay unsteered"
    assert torch.equal(seen[-1][3:], add_vectors(h[3:], v, None))

    tables.fill([ScheduledRequest("o", 3, 1, 3, (-1,)), ScheduledRequest("r", 9, 1, 9, (0,))])
    x = torch.cat([other[:1], full[9:10]])
    model(x)
    h = _stream_after(model, x, 0)
    assert torch.equal(seen[-1][0], h[0])
    assert torch.equal(seen[-1][1:], add_vectors(h[1:], v, None)), "decode adds the cached vector"


def test_prompt_hook_all_positions():
    torch.manual_seed(2)
    d = 32
    model = _FakeModel(d, 2)
    st = random_steerer(d, layer=0, seed=4, gate_mode=None, with_gate=False)
    tables = fv.attach(model, [st], backend="reference", mode="prompt", prompt_positions="all", max_tokens=16,
                       max_seqs=2)
    seen = []
    model.model.layers[1].register_forward_pre_hook(lambda m, a: seen.append(a[0] + a[1]))
    x = torch.randn(6, d)
    tables.fill([ScheduledRequest("r", 0, 6, 6, (0,))])
    model(x)
    h = _stream_after(model, x, 0)
    v = steering_vectors(h[[5, 0]], SteeringBankOf([st]), torch.tensor([0, -1]))[:1]
    assert torch.equal(seen[-1], add_vectors(h, v, torch.zeros(6, dtype=torch.int32)))


# --------------------------------------------------------------------------------------------
# step tables: what each token uses
# --------------------------------------------------------------------------------------------

def _prompt_tables(positions="from_last", max_seqs=2, banks=(2,)):
    return StepTables(list(banks), "prompt", positions, 32, max_seqs, 8, torch.device("cpu"))


def test_tables_last_prompt_token_rule_includes_preemption_recompute():
    t = _prompt_tables()
    # After preemption a request with a 6-token prompt and 3 outputs recomputes all 9 in one step:
    # computed (0) < prompt (6) <= 0 + 9 holds, so its vector is recomputed at position 5.
    t.fill([ScheduledRequest("p", 0, 9, 6, (1,))])
    s = int(t.sel_slot[0])
    assert t.sel_pos[0] == 5 and t.sel_index[0, 0] == 1 and s < 2
    assert t.slot[:9].tolist() == [-1] * 5 + [s] * 4
    assert (t.sel_slot[1:] >= 2).all() and (t.sel_index[0, 1:] == -1).all(), "unused rows write to scratch"
    # A chunk ending exactly before the last prompt token holds none of it.
    t.fill([ScheduledRequest("q", 0, 5, 6, (0,))])
    assert (t.sel_slot >= 2).all() and (t.slot[:5] == -1).all()
    # A one-token final chunk (as a decode batch) holds it.
    t.fill([ScheduledRequest("q", 5, 1, 6, (0,))])
    assert t.sel_pos[0] == 0 and int(t.sel_slot[0]) < 2 and t.slot[0] == t.sel_slot[0]


def test_tables_slots_survive_preemption_and_park_when_full():
    t = _prompt_tables(max_seqs=2)
    t.fill([ScheduledRequest("a", 0, 4, 4, (0,)), ScheduledRequest("b", 0, 4, 4, (1,))])
    sa, sb = int(t.sel_slot[0]), int(t.sel_slot[1])
    t.vectors[0][sa] = 1.0   # stand-ins for the vectors the hook writes
    t.vectors[0][sb] = 2.0
    # "a" is preempted (absent); a new request "c" needs a row: "a"'s vector is parked.
    t.fill([ScheduledRequest("b", 4, 1, 4, (1,)), ScheduledRequest("c", 0, 3, 3, (0,))])
    assert t.slots_in_use == 2 and t.slot[0] == sb
    sc = int(t.slot[3])
    assert sc == sa
    t.vectors[0][sc] = 3.0
    # "a" resumes past its prompt (prefix-cache hit on its own blocks): no recompute, its vector
    # comes back from the parked copy; "c" (absent now) is parked in turn.
    t.finish(["b"])
    t.fill([ScheduledRequest("a", 6, 1, 4, (0,))])
    assert (t.sel_slot >= 2).all(), "no last prompt token in this step"
    assert torch.equal(t.vectors[0][int(t.slot[0])], torch.full((8,), 1.0))
    t.finish(["a", "c"])
    assert t.slots_in_use == 0 and not t._parked


def test_tables_token_mode_and_size_check():
    t = StepTables([2, 1], "token", "from_last", 8, 2, 4, torch.device("cpu"))
    t.fill([ScheduledRequest("a", 0, 3, 3, (1, -1)), ScheduledRequest("b", 3, 1, 3, (-1, 0))])
    assert t.token_index[:, :5].tolist() == [[1, 1, 1, -1, -1], [-1, -1, -1, 0, -1]]
    with pytest.raises(RuntimeError, match="exceeds the 8 rows"):
        t.fill([ScheduledRequest("a", 0, 9, 9, (0, 0))])


# --------------------------------------------------------------------------------------------
# configuration, names, refusals, fingerprint, prefix-cache key
# --------------------------------------------------------------------------------------------

def test_parse_config_forms_and_errors():
    assert fv.parse_config({}) is None
    assert fv.parse_config({"other": 1}) is None
    cfg = fv.parse_config({"finesteer": {"steerers": ["a.safetensors", {"path": "b", "strength": 2, "name": "x"}]}})
    assert cfg.mode == "token" and cfg.backend == "auto" and cfg.default == ()
    assert cfg.steerers == (fv.SteererSpec("a.safetensors"), fv.SteererSpec("b", 2.0, "x"))
    assert [s.label for s in cfg.steerers] == ["a", "x"]
    cfg = fv.parse_config({"finesteer": {"steerers": ["d/a.safetensors"], "mode": "prompt", "default": "a"}})
    assert cfg.mode == "prompt" and cfg.prompt_positions == "from_last" and cfg.default == ("a",)
    bad = [
        ({"finesteer": []}, "must be an object"),
        ({"finesteer": {"steerers": []}}, "non-empty list"),
        ({"finesteer": {"steerers": ["a"], "mode": "prefix"}}, "mode 'prefix' is not supported"),
        ({"finesteer": {"steerers": ["a"], "prompt_positions": "all"}}, "applies to mode 'prompt' only"),
        ({"finesteer": {"steerers": ["a"], "mode": "prompt", "prompt_positions": "x"}}, "prompt_positions 'x'"),
        ({"finesteer": {"steerers": ["a"], "bogus": 1}}, "unknown key"),
        ({"finesteer": {"steerers": [3]}}, "steerers[0] must be a path"),
        ({"finesteer": {"steerers": [{"path": "a", "strength": "x"}]}}, "strength must be a number"),
        ({"finesteer": {"steerers": [{"path": "a", "name": ""}]}}, "name must be a non-empty string"),
        ({"finesteer": {"steerers": ["dir/none.safetensors"]}}, "is named 'none'"),
        ({"finesteer": {"steerers": ["a"], "default": "b"}}, "'default' names unknown steerer(s) ['b']"),
        ({"finesteer": {"steerers": ["a"], "default": 3}}, "'default' must be a steerer name"),
    ]
    for conf, msg in bad:
        with pytest.raises(fv.FineSteerConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")
                           .replace("(", r"\(").replace(")", r"\)")):
            fv.parse_config(conf)


def _files(tmp_path):
    paths = {}
    for name, layer, seed in (("a", 0, 1), ("b", 0, 2), ("c", 1, 3)):
        paths[name] = tmp_path / f"{name}.safetensors"
        random_steerer(D, layer=layer, seed=seed).save(paths[name])
    return paths


def test_catalog_resolves_request_choices(tmp_path):
    p = _files(tmp_path)
    cfg = fv.parse_config({"finesteer": {"steerers": [str(p["a"]), str(p["b"]), str(p["c"]),
                                                       {"path": str(p["c"]), "name": "b"}]}})
    with pytest.raises(fv.FineSteerConfigError, match="both named 'c' at layer 1"):
        fv.build_catalog(fv.parse_config({"finesteer": {"steerers": [str(p["c"]), {"path": str(p["c"]), "name": "c"}]}}))
    cat = fv.build_catalog(cfg)
    assert cat.layers == (0, 1) and cat.bank_sizes == (2, 2)
    assert cat.resolve(None) == (-1, -1) and cat.resolve("none") == (-1, -1) and cat.resolve([]) == (-1, -1)
    assert cat.resolve("a") == (0, -1)
    assert cat.resolve("b") == (1, 1), "a name labelling steerers at two layers selects both"
    assert cat.resolve(["a", "c"]) == (0, 0)
    for value, msg in [("zzz", "unknown steerer name 'zzz'.*served: a, b, c"), (["a", "b"], "both at layer 0"),
                       (3, "must be a steerer name"), (["a", "a"], "names a steerer twice"),
                       (["none", "a"], "cannot be combined")]:
        with pytest.raises(ValueError, match=msg):
            cat.resolve(value)
    with_default = fv.build_catalog(fv.parse_config({"finesteer": {"steerers": [str(p["a"]), str(p["c"])],
                                                                   "default": ["a", "c"]}}))
    assert with_default.resolve(None) == (0, 0) and with_default.resolve("none") == (-1, -1)


def test_load_and_check_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    random_steerer(D, layer=1).save(good)
    other = tmp_path / "other.safetensors"
    random_steerer(D, layer=1, seed=4).save(other)
    small = tmp_path / "small.safetensors"
    random_steerer(64, layer=0).save(small)
    deep = tmp_path / "deep.safetensors"
    random_steerer(D, layer=LAYERS).save(deep)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    arch = ["LlamaForCausalLM"]

    response = tmp_path / "response.safetensors"
    st = random_steerer(D, layer=1)
    st.metadata["gate_tokens"] = "response"
    st.save(response)

    def check(paths, archs=arch, backend="auto", mode="token"):
        cfg = fv.parse_config({"finesteer": {"steerers": [str(p) for p in paths], "backend": backend, "mode": mode}})
        return fv.load_and_check(cfg, archs, D, LAYERS, model_name="model 'tiny'")

    assert check([response])[0].metadata["gate_tokens"] == "response"  # token mode reads every token

    (st,) = check([good])
    assert st.layer == 1 and st.hidden_size == D
    assert [s.layer for s in check([good, other])] == [1, 1], "two steerers at one layer form a bank"
    cases = [
        (([tmp_path / "missing.safetensors"],), "does not exist"),
        (([junk],), "is not usable"),
        (([small],), "was fitted for hidden size 64, but model 'tiny' has hidden size 128"),
        (([deep],), f"bound to layer {LAYERS}, but model 'tiny' has {LAYERS} decoder layers"),
        (([good], ["GPT2LMHeadModel"]), "architecture GPT2LMHeadModel of model 'tiny' is not supported"),
        (([good, good],), "both named 'good' at layer 1"),
        (([good], arch, "nope"), "unknown backend 'nope'"),
        (([response], arch, "auto", "prompt"), "gate fitted on response tokens .* serve it in mode 'token'"),
    ]
    for args, msg in cases:
        with pytest.raises(fv.FineSteerConfigError, match=msg) as info:
            check(*args)
        assert "\n" not in str(info.value), "each problem is one line"


def _vllm_config(**over):
    base = dict(use_v2_model_runner=False, kv_transfer_config=None, speculative_config=None,
                parallel_config=NS(enable_dbo=False, ubatch_size=1, decode_context_parallel_size=1,
                                   prefill_context_parallel_size=1),
                scheduler_config=NS(enable_chunked_prefill=False), cache_config=NS(enable_prefix_caching=False))
    base.update(over)
    return NS(**base)


def test_start_up_refusals():
    token = fv.parse_config({"finesteer": {"steerers": ["a"]}})
    prompt = fv.parse_config({"finesteer": {"steerers": ["a"], "mode": "prompt"}})
    every = fv.parse_config({"finesteer": {"steerers": ["a"], "mode": "prompt", "prompt_positions": "all"}})
    for cfg in (token, prompt, every):
        fv.check_engine_support(cfg, _vllm_config())
    pc = _vllm_config().parallel_config
    cases = [
        (token, dict(use_v2_model_runner=True), "V2 model runner is not supported"),
        (token, dict(parallel_config=NS(**{**vars(pc), "enable_dbo": True})), "micro-batching"),
        (token, dict(parallel_config=NS(**{**vars(pc), "decode_context_parallel_size": 2})), "context parallelism"),
        (token, dict(parallel_config=NS(**{**vars(pc), "prefill_context_parallel_size": 2})), "context parallelism"),
        (prompt, dict(kv_transfer_config=object()), "KV-transfer connector"),
        (prompt, dict(speculative_config=NS(enable_adaptive_verification=True)), "adaptive speculative"),
        (every, dict(scheduler_config=NS(enable_chunked_prefill=True)), "enable_chunked_prefill=False"),
        (every, dict(cache_config=NS(enable_prefix_caching=True)), "enable_prefix_caching=False"),
    ]
    for cfg, over, msg in cases:
        with pytest.raises(fv.FineSteerConfigError, match=msg) as info:
            fv.check_engine_support(cfg, _vllm_config(**over))
        assert "\n" not in str(info.value)
    # Token mode serves with KV transfer and adaptive verification (every instance steers alike).
    fv.check_engine_support(token, _vllm_config(kv_transfer_config=object(),
                                                speculative_config=NS(enable_adaptive_verification=True)))


def test_fingerprint_follows_the_files_and_settings(tmp_path):
    p = _files(tmp_path)
    cfg = fv.parse_config({"finesteer": {"steerers": [str(p["a"])]}})
    fp = fv.fingerprint(cfg)
    assert fp == fv.fingerprint(cfg)
    assert fp != fv.fingerprint(fv.parse_config({"finesteer": {"steerers": [{"path": str(p["a"]), "strength": 2}]}}))
    random_steerer(D, layer=0, seed=9).save(p["a"])
    assert fp != fv.fingerprint(cfg), "a changed steerer file changes the fingerprint"


def test_prefix_cache_key_separates_steered_blocks(tmp_path):
    p = _files(tmp_path)
    token = fv.parse_config({"finesteer": {"steerers": [str(p["a"]), str(p["b"])]}})
    prompt = fv.parse_config({"finesteer": {"steerers": [str(p["a"]), str(p["b"])], "mode": "prompt"}})

    def req(choice, n_prompt):
        return NS(sampling_params=NS(extra_args=None if choice is None else {"finesteer": choice}),
                  num_prompt_tokens=n_prompt)

    key = lambda cfg, r, end: fv.block_hash_key(cfg, fv.build_catalog(cfg), r, end)  # noqa: E731
    assert key(token, req(None, 40), 16) is None, "unsteered requests keep vLLM's own key"
    assert key(token, req("a", 40), 16) != key(token, req("b", 40), 16) is not None
    # Prompt mode: blocks before the last prompt token are unsteered and shared by every choice.
    assert key(prompt, req("a", 40), 32) is None and key(prompt, req("b", 40), 32) is None
    # The block holding the last prompt token (and later ones) is keyed by choice and prompt
    # length: a later request whose prompt contains this one's outputs computes them unsteered.
    assert key(prompt, req("a", 40), 48) == ("finesteer", (0,), 40)
    assert key(prompt, req("a", 40), 48) != key(prompt, req("a", 48), 48)
    assert NS(sampling_params=None) and key(prompt, NS(sampling_params=None), 48) is None


def test_only_the_served_model_is_steered_not_a_drafter():
    target, draft = object(), object()
    plain = NS(model_config=target, speculative_config=None)
    assert fv.is_served_model(plain, target)
    assert not fv.is_served_model(plain, draft)
    spec = NS(draft_model_config=draft)
    assert fv.is_served_model(NS(model_config=target, speculative_config=spec), target)
    # EAGLE heads: target config, draft model config passed explicitly.
    assert not fv.is_served_model(NS(model_config=target, speculative_config=spec), draft)
    # Draft models: a config copy whose model_config is the draft config.
    assert not fv.is_served_model(NS(model_config=draft, speculative_config=spec), draft)


def test_runner_wrappers_fill_free_and_reset(tmp_path):
    """The V1-runner wrappers on a stand-in runner: ``_prepare_inputs`` fills the tables from the
    persistent batch and each request's ``extra_args``; ``_update_states`` frees finished
    requests even on a step without tokens; ``_dummy_run`` resets to "nothing steered"."""
    import numpy as np

    p = _files(tmp_path)
    cfg = fv.parse_config({"finesteer": {"steerers": [str(p["a"]), str(p["b"])], "mode": "prompt"}})
    model = _FakeModel(D, 1)
    steerers = [random_steerer(D, layer=0, seed=1), random_steerer(D, layer=0, seed=2)]
    tables = fv.attach(model, steerers, backend="reference", mode="prompt", max_tokens=16, max_seqs=2,
                       catalog=fv.build_catalog(cfg))

    class Runner:
        def _update_states(self, scheduler_output):
            return "updated"

        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
            return "prepared"

        def _dummy_run(self, num_tokens):
            return "dummy"

    for name, wrap in (("_update_states", fv._wrap_update_states), ("_prepare_inputs", fv._wrap_prepare_inputs),
                       ("_dummy_run", fv._wrap_dummy_run)):
        setattr(Runner, name, wrap(getattr(Runner, name)))
    runner = Runner()
    runner.model = model
    runner.requests = {"x": NS(sampling_params=NS(extra_args={"finesteer": "b"})),
                       "y": NS(sampling_params=NS(extra_args=None))}
    runner.input_batch = NS(num_reqs=2, req_ids=["y", "x"], num_computed_tokens_cpu=np.array([0, 0]),
                            num_prompt_tokens=np.array([3, 4]))
    out = NS(finished_req_ids=set())
    assert runner._update_states(out) == "updated"
    assert runner._prepare_inputs(out, np.array([3, 4])) == "prepared"
    assert tables.slot[:7].tolist() == [-1, -1, -1, -1, -1, -1, 0]
    assert tables.sel_pos[0] == 6 and tables.sel_index[0, 0] == 1 and tables.slots_in_use == 1
    assert runner._dummy_run(4) == "dummy"
    assert (tables.slot == -1).all() and (tables.sel_slot >= 2).all() and (tables.sel_index == -1).all()
    runner._update_states(NS(finished_req_ids={"x"}))
    assert tables.slots_in_use == 0


# --------------------------------------------------------------------------------------------
# a vLLM without the private functions the plugin hooks: refused with one clear line
# --------------------------------------------------------------------------------------------

def test_patch_reports_whether_the_class_defines_the_hook():
    class Base:
        def f(self):
            return 1

    class Sub(Base):
        pass

    wrapped = []

    def wrapper(fn):
        def g(self):
            return fn(self) + 1
        g._finesteer_wrapped = True
        wrapped.append(fn)
        return g

    assert fv._patch(Base, "f", wrapper) and Base().f() == 2
    assert fv._patch(Base, "f", wrapper) and len(wrapped) == 1  # wrapped once
    assert not fv._patch(Sub, "f", wrapper)  # inherited, not defined: nothing to wrap there
    assert not fv._patch(Base, "absent", wrapper)


def test_a_model_runner_without_the_hooked_methods_is_refused(monkeypatch):
    import sys
    import types

    fake = types.ModuleType(fv.RUNNER_MODULE)

    class GPUModelRunner:
        def _update_states(self, scheduler_output):
            return None

        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
            return None

    fake.GPUModelRunner = GPUModelRunner
    monkeypatch.setitem(sys.modules, fv.RUNNER_MODULE, fake)
    with pytest.raises(fv.FineSteerConfigError, match=r"GPUModelRunner\._dummy_run") as info:
        fv._patch_model_runner()
    assert "tested with vLLM 0.32" in str(info.value) and "\n" not in str(info.value)
    assert "_finesteer_wrapped" not in vars(GPUModelRunner._update_states)  # nothing half-patched
    # vLLM 0.34 removed the V1 runner module altogether
    monkeypatch.setitem(sys.modules, fv.RUNNER_MODULE, None)
    with pytest.raises(fv.FineSteerConfigError, match="the V1 model runner"):
        fv._patch_model_runner()


def test_check_vllm_hooks_names_every_missing_function(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == fv.RUNNER_MODULE else real_find_spec(name, *a))
    monkeypatch.setattr(fv, "_missing_hooks", ["vllm.v1.core.kv_cache_utils.generate_block_hash_extra_keys"])
    assert fv.missing_hooks() == ["vllm.v1.core.kv_cache_utils.generate_block_hash_extra_keys",
                                  f"{fv.RUNNER_MODULE} (the V1 model runner)"]
    with pytest.raises(fv.FineSteerConfigError, match="generate_block_hash_extra_keys.*V1 model runner"):
        fv.check_vllm_hooks()
    # The configuration check (front end and workers) refuses before anything else, only when
    # steering is configured.
    with pytest.raises(fv.FineSteerConfigError, match="V1 model runner"):
        fv.check_vllm_config(NS(additional_config={"finesteer": {"steerers": ["missing.safetensors"]}}))
    assert fv.check_vllm_config(NS(additional_config={})) is None
