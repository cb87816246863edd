"""The vLLM plugin: its pure parts always, and a real vLLM engine (CPU build) when vLLM is installed.

The end-to-end test serves a tiny random Llama through ``vllm.LLM`` with the plugin and one
steerer (greedy, fp32) and checks the generated tokens against HuggingFace token-mode steering
on the same weights: :class:`finesteer.FusedSteerer` (``mode="token"``), itself checked against
a forward hook applying :func:`finesteer.reference.steer_tokens` to the decoder layer's output,
which is the definition (DESIGN §1, §4). vLLM spawns its engine and
worker processes, so the engine runs in a child ``python`` (see :func:`serve_main`), with two
tensor-parallel ranks where the machine allows (two CPU cores on vLLM's CPU build).

The model and steerer are built so the check cannot pass vacuously: one "trigger" token has a
large embedding along a direction ``e``; the steerer's gate subspace is ``e`` (so the gate opens
on the trigger's row only) and its expert vector is large. A prompt ending in the trigger must
then generate differently from the unsteered model, and a benign prompt (every row's gate closed)
must generate exactly as unsteered, in the same batch.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finesteer import MoSE, SCSGate, Steerer
from finesteer.integrations import vllm as fv
from finesteer.reference import steer_tokens as reference_steer_tokens
from tests.utils import random_steerer

REPO = Path(__file__).resolve().parents[1]


def _vllm_importable() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


HAS_VLLM = _vllm_importable()
SKIP_REASON = "vLLM is not installed (pip install 'finesteer[vllm]'; on CPU: bash scripts/install_vllm_cpu.sh)"

# Tiny Llama: head_dim 64 (vLLM's CPU attention has no kernel for head_dim 16).
D, LAYERS, VOCAB, TRIGGER, STEER_LAYER = 128, 2, 128, 100, 0
PROMPT_STEERED = [5, 17, 42, 9, TRIGGER]       # ends in the trigger: its row opens the gate
PROMPT_BENIGN = [7, 8, 30, 61, 3, 12]         # no trigger: every row's gate stays closed
NEW_TOKENS = 12


# --------------------------------------------------------------------------------------------
# fixtures: the tiny model and the steerer
# --------------------------------------------------------------------------------------------

def _trigger_direction() -> torch.Tensor:
    e = torch.randn(D, generator=torch.Generator().manual_seed(11))
    return e / e.norm()


def build_model_dir(path: Path) -> Path:
    """A random fp32 Llama with an offline-built word-level tokenizer, saved with ``save_pretrained``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=256, num_hidden_layers=LAYERS,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        model.model.embed_tokens.weight[TRIGGER] = 5.0 * _trigger_direction()
    model.save_pretrained(path)
    return path


def build_steerer(layer: int = STEER_LAYER, d: int = D) -> Steerer:
    """Gate subspace = the trigger direction (μ = 0, τ = 0.5, hard); one large expert vector."""
    g = torch.Generator().manual_seed(3)
    e = _trigger_direction() if d == D else torch.randn(d, generator=g)
    gate = SCSGate(P=(e / e.norm())[:, None], mu=torch.zeros(d), threshold=0.5)
    v = torch.randn(1, d, generator=g)
    mose = MoSE(R=torch.zeros(d, 1), c=torch.zeros(1), V=4.0 * v / v.norm(),
                U=torch.randn(d, 2, generator=g) * 0.05, W1=torch.randn(8, d, generator=g) * d ** -0.5,
                b1=torch.zeros(8), W2=torch.randn(2, 8, generator=g) * 0.1, b2=torch.zeros(2))
    return Steerer(gate=gate, mose=mose, strength=1.0, layer=layer, gate_mode="hard")


def hf_generate(model_dir: Path, steerer, prompts, new_tokens: int, how: str = "hook"):
    """Greedy HF generation (no KV cache: each step reruns the sequence, so token mode sees every row).

    ``steerer=None``: unsteered. ``how="hook"``: a forward hook on the steerer's decoder layer
    applying :func:`finesteer.reference.steer_tokens` (the definition). ``how="fused"``:
    :class:`finesteer.FusedSteerer` in token mode (the project's HF integration).
    Returns (token lists, per-prompt gate values of the prompt rows at the first forward)."""
    from transformers import LlamaForCausalLM

    from finesteer import FusedSteerer

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gates = []
    layer = model.model.layers[steerer.layer] if steerer is not None else None
    handles = []
    if steerer is not None:
        # Records the gate of every row the steerer sees (the block output, before steering).
        handles.append(layer.register_forward_hook(
            lambda m, a, out: gates.append(steerer.gate_value((out[0] if isinstance(out, tuple) else out)[0]))))
    if steerer is not None and how == "hook":
        bank = steerer.bank()

        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            out = reference_steer_tokens(h.reshape(-1, h.shape[-1]), bank, None).reshape(h.shape)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        handles.append(layer.register_forward_hook(hook))
    fused = FusedSteerer.attach(model, steerer, mode="token", backend="reference") \
        if steerer is not None and how == "fused" else None
    results, prompt_gates = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            gates.clear()
            for _ in range(new_tokens):
                nxt = model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if steerer is not None:
                prompt_gates.append(gates[0])
            results.append(ids[0, len(prompt):].tolist())
    for handle in handles:
        handle.remove()
    if fused is not None:
        fused.detach()
    return results, prompt_gates


# --------------------------------------------------------------------------------------------
# the pure parts (no vLLM needed)
# --------------------------------------------------------------------------------------------

class _FakeLayer(torch.nn.Module):
    """Returns (hidden_states, residual) like a vLLM decoder layer."""

    def __init__(self, d):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(d, d) * d ** -0.5)

    def forward(self, x, residual):
        return x @ self.w, x if residual is None else residual + x


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hook_stream_equals_reference_exactly(dtype):
    """(0, steer(hs + res)) gives the next layer exactly DESIGN §4's output on the stream."""
    torch.manual_seed(0)
    d, n, T = 48, 3, 37
    model = _FakeModel(d, n).to(dtype)
    st = random_steerer(d, layer=1, seed=2)
    x = torch.randn(T, d, dtype=dtype)
    captured = {}
    model.model.layers[2].register_forward_pre_hook(lambda m, a: captured.update(stream=a[0] + a[1]))

    plain = model(x)
    unsteered_stream = captured["stream"]
    handles = fv.attach(model, [st], backend="reference")
    assert len(handles) == 1
    steered = model(x)
    # Layer 1's stream, recomputed unsteered, then steered by the reference: must match bit for bit.
    with torch.no_grad():
        hs, res = x, None
        for layer in list(model.model.layers)[:2]:
            hs, res = layer.forward(hs, res)  # .forward bypasses the hook
        expected = reference_steer_tokens(hs + res, st.bank(), None)
    assert torch.equal(captured["stream"], expected)
    gate = st.gate_value((hs + res).float())
    assert 0 < int((gate > 0).sum()) < T, "the random steerer should open the gate on some rows only"
    closed = gate == 0
    assert torch.equal(captured["stream"][closed], (hs + res)[closed])
    assert not torch.equal(steered, plain)
    fv.detach(model)
    assert torch.equal(model(x), plain)
    assert torch.equal(captured["stream"], unsteered_stream)


def test_steer_residual_stream_is_steer_tokens_of_sum():
    torch.manual_seed(1)
    st = random_steerer(32, seed=5)
    hs, res = torch.randn(9, 32), torch.randn(9, 32)
    out = fv.steer_residual_stream(hs, res, st.bank(), None, "reference")
    assert torch.equal(out, reference_steer_tokens(hs + res, st.bank(), None))


def test_parse_config_forms_and_errors():
    assert fv.parse_config({}) is None
    assert fv.parse_config({"other": 1}) is None
    cfg = fv.parse_config({"finesteer": {"steerers": ["a.safetensors", {"path": "b", "strength": 2}]}})
    assert cfg.mode == "token" and cfg.backend == "auto"
    assert cfg.steerers == (fv.SteererSpec("a.safetensors"), fv.SteererSpec("b", 2.0))
    bad = [
        ({"finesteer": []}, "must be an object"),
        ({"finesteer": {"steerers": []}}, "non-empty list"),
        ({"finesteer": {"steerers": ["a"], "mode": "prompt"}}, "mode 'prompt' is not supported"),
        ({"finesteer": {"steerers": ["a"], "bogus": 1}}, "unknown key"),
        ({"finesteer": {"steerers": [3]}}, "steerers[0] must be a path"),
        ({"finesteer": {"steerers": [{"path": "a", "strength": "x"}]}}, "strength must be a number"),
    ]
    for conf, msg in bad:
        with pytest.raises(fv.FineSteerConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            fv.parse_config(conf)


def test_only_the_served_model_is_steered_not_a_drafter():
    from types import SimpleNamespace as NS

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

    def check(paths, archs=arch, backend="auto"):
        cfg = fv.parse_config({"finesteer": {"steerers": [str(p) for p in paths], "backend": backend}})
        return fv.load_and_check(cfg, archs, D, LAYERS, model_name="model 'tiny'")

    (st,) = check([good])
    assert st.layer == 1 and st.hidden_size == D
    cases = [
        (([tmp_path / "missing.safetensors"],), "does not exist"),
        (([junk],), "is not usable"),
        (([small],), "was fitted for hidden size 64, but model 'tiny' has hidden size 128"),
        (([deep],), f"bound to layer {LAYERS}, but model 'tiny' has {LAYERS} decoder layers"),
        (([good], ["GPT2LMHeadModel"]), "architecture GPT2LMHeadModel of model 'tiny' is not supported"),
        (([good, other],), "both bound to layer 1"),
        (([good], arch, "nope"), "unknown backend 'nope'"),
    ]
    for args, msg in cases:
        with pytest.raises(fv.FineSteerConfigError, match=msg) as info:
            check(*args)
        assert "\n" not in str(info.value), "each problem is one line"


# --------------------------------------------------------------------------------------------
# a real vLLM engine
# --------------------------------------------------------------------------------------------

def _tensor_parallel_size() -> int:
    """2 when this machine can run two vLLM ranks (two CPU cores on the CPU build, two GPUs), else 1."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return 1
        # vLLM's automatic binding wants one NUMA node per rank; bind one core per rank instead.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[1]}")
        return 2
    return 2 if torch.cuda.device_count() >= 2 else 1


def serve_main(job_path: str) -> None:
    """Child-process body: bad configurations first (each must fail before an engine starts), then
    serve the good one and write the generated tokens. Run as ``python -c`` from the repo root."""
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams

    common = dict(model=job["model"], dtype="float32", gpu_memory_utilization=0.3, max_model_len=128,
                  max_num_seqs=4, max_num_batched_tokens=128, enforce_eager=True, seed=0)
    # Two tensor-parallel ranks where the machine has them: the stream is replicated on every
    # rank and each rank must steer it identically (on CPU each rank is a process on one core).
    common["tensor_parallel_size"] = _tensor_parallel_size()
    common.update(job.get("engine", {}))  # e.g. {"enforce_eager": false} or {"tensor_parallel_size": 1}
    results = {"bad": {}}
    for name, conf in job["bad"].items():
        t0 = time.perf_counter()
        try:
            LLM(**common, additional_config=conf)
            results["bad"][name] = {"error": None}
        except Exception as exc:  # the type and message are checked by the parent
            results["bad"][name] = {"type": type(exc).__name__, "error": str(exc),
                                    "seconds": time.perf_counter() - t0}
    llm = LLM(**common, additional_config=job["good"])
    params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
    results["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    results["tensor_parallel_size"] = common["tensor_parallel_size"]
    Path(job["out"]).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    """Build the model and steerers, run :func:`serve_main` once in a child python, return its results."""
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.value.startswith("finesteer")]
    if not eps:
        pytest.fail("finesteer's 'vllm.general_plugins' entry point is not installed: add it to pyproject.toml "
                    "and reinstall finesteer (pip install -e .)")
    tmp = tmp_path_factory.mktemp("vllm")
    model_dir = build_model_dir(tmp / "tiny-llama")
    steerer = build_steerer()
    good = tmp / "steer.safetensors"
    steerer.save(good)
    small = tmp / "small.safetensors"
    random_steerer(64, layer=0).save(small)
    deep = tmp / "deep.safetensors"
    random_steerer(D, layer=LAYERS + 3).save(deep)
    job = {
        "model": str(model_dir), "new_tokens": NEW_TOKENS, "prompts": [PROMPT_STEERED, PROMPT_BENIGN],
        "good": {"finesteer": {"steerers": [str(good)], "mode": "token", "backend": "reference"}},
        "bad": {
            "missing": {"finesteer": {"steerers": [str(tmp / "nope.safetensors")]}},
            "hidden": {"finesteer": {"steerers": [str(small)]}},
            "layer": {"finesteer": {"steerers": [str(deep)]}},
        },
        "out": str(tmp / "out.json"),
    }
    (tmp / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "import sys; from tests.test_vllm import serve_main; "
                           "serve_main(sys.argv[1])", str(tmp / "job.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        pytest.fail(f"vLLM child failed (rc {proc.returncode}) after {seconds:.0f} s:\n{proc.stderr[-6000:]}")
    return {"results": json.loads(Path(job["out"]).read_text()), "model_dir": model_dir, "steerer": steerer,
            "seconds": seconds, "tmp": tmp}


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason=SKIP_REASON)
def test_vllm_token_mode_matches_hf(vllm_run):
    model_dir, steerer = vllm_run["model_dir"], vllm_run["steerer"]
    prompts = [PROMPT_STEERED, PROMPT_BENIGN]
    hf_plain, _ = hf_generate(model_dir, None, prompts, NEW_TOKENS)
    hf_steered, _ = hf_generate(model_dir, steerer, prompts, NEW_TOKENS, how="fused")
    hf_defined, gates = hf_generate(model_dir, steerer, prompts, NEW_TOKENS, how="hook")
    assert hf_steered == hf_defined, "FusedSteerer token mode disagrees with the reference hook"
    got = vllm_run["results"]["tokens"]
    tp = vllm_run["results"]["tensor_parallel_size"]
    # Preconditions that make the comparison meaningful.
    assert gates[0][-1] == 1 and gates[0][:-1].eq(0).all(), f"gate should open on the trigger row only: {gates[0]}"
    assert gates[1].eq(0).all(), f"benign prompt rows should all have a closed gate: {gates[1]}"
    assert TRIGGER not in hf_plain[1] and TRIGGER not in hf_steered[1]
    assert hf_steered[0] != hf_plain[0], "the steerer must change the steered prompt's generation"
    # vLLM with the plugin == HF token-mode steering; the benign prompt, batched with it, is unchanged.
    assert got[0] == hf_steered[0], \
        f"steered prompt: vLLM (TP={tp}) {got[0]} != HF {hf_steered[0]} (unsteered {hf_plain[0]})"
    assert got[1] == hf_plain[1] == hf_steered[1], f"benign prompt: vLLM (TP={tp}) {got[1]}, HF {hf_plain[1]}"


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason=SKIP_REASON)
@pytest.mark.parametrize("name, message", [
    ("missing", r"finesteer vLLM plugin: steerer file '.*nope\.safetensors' does not exist"),
    ("hidden", r"finesteer vLLM plugin: steerer '.*small\.safetensors' was fitted for hidden size 64, "
               r"but model '.*' has hidden size 128"),
    ("layer", rf"finesteer vLLM plugin: steerer '.*deep\.safetensors' is bound to layer {LAYERS + 3}, "
              rf"but model '.*' has {LAYERS} decoder layers"),
])
def test_vllm_bad_config_fails_before_serving(vllm_run, name, message):
    import re

    bad = vllm_run["results"]["bad"][name]
    assert bad["error"] is not None, f"LLM(...) with the {name!r} configuration started instead of failing"
    assert bad["type"] == "FineSteerConfigError", bad
    assert re.search(message, bad["error"]) and "\n" not in bad["error"], bad["error"]
    # Raised in the front end while vLLM builds its config, before any engine process starts
    # (starting one takes tens of seconds on these CPUs).
    assert bad["seconds"] < 10, f"the error came after {bad['seconds']:.1f} s: was an engine started?"

