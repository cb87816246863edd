"""Shared pieces of the vLLM tests: a tiny Llama and steerers built so no check passes vacuously,
the HuggingFace references, and the child-process body that serves them with ``vllm.LLM``.

One "trigger" token has a large embedding along a direction ``e``; every steerer's gate subspace
is ``e`` (μ = 0, τ = 0.5, hard), so the gate opens on the trigger's row only, and each steerer's
expert vector is large and different. A prompt ending in the trigger must then generate
differently under each steerer and unsteered; a prompt without it (every gate closed) must
generate exactly as unsteered, in the same batch.

vLLM spawns engine and worker processes, so each engine runs in a child ``python`` (see
:func:`serve_main` and :func:`run_child`).
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

from finesteer import FusedSteerer, MoSE, SCSGate, Steerer

REPO = Path(__file__).resolve().parents[1]


def _vllm_importable() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


HAS_VLLM = _vllm_importable()
SKIP_REASON = "vLLM is not installed (pip install 'finesteer[vllm]'; on CPU: bash scripts/install_vllm_cpu.sh)"
needs_vllm = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.skipif(not HAS_VLLM, reason=SKIP_REASON)]

# Tiny Llama: head_dim 64 (vLLM's CPU attention has no kernel for head_dim 16).
D, LAYERS, VOCAB, TRIGGER = 128, 2, 128, 100
NEW_TOKENS = 10


def trigger_direction() -> torch.Tensor:
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
        model.model.embed_tokens.weight[TRIGGER] = 5.0 * trigger_direction()
    model.save_pretrained(path)
    return path


def build_steerer(layer: int = 0, seed: int = 3, d: int = D, gated: bool = True) -> Steerer:
    """Gate subspace = the trigger direction (μ = 0, τ = 0.5, hard), or no gate (``gated=False``:
    every row is steered); one large expert vector."""
    g = torch.Generator().manual_seed(seed)
    e = trigger_direction() if d == D else torch.randn(d, generator=g)
    gate = SCSGate(P=(e / e.norm())[:, None], mu=torch.zeros(d), threshold=0.5)
    v = torch.randn(1, d, generator=g)
    mose = MoSE(R=torch.zeros(d, 1), c=torch.zeros(1), V=4.0 * v / v.norm(),
                U=torch.randn(d, 2, generator=g) * 0.05, W1=torch.randn(8, d, generator=g) * d ** -0.5,
                b1=torch.zeros(8), W2=torch.randn(2, 8, generator=g) * 0.1, b2=torch.zeros(2))
    if not gated:
        return Steerer(gate=None, mose=mose, strength=1.0, layer=layer, gate_mode="off")
    return Steerer(gate=gate, mose=mose, strength=1.0, layer=layer, gate_mode="hard")


def load_hf(model_dir: Path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # vLLM runs with ignore_eos=True
    return model


def hf_token_mode(model, steerers, prompt, index, new_tokens: int = NEW_TOKENS) -> list:
    """Greedy tokens under token mode with ``FusedSteerer`` (reference backend), no KV cache (each
    step reruns the sequence, so every row computes its own gate). ``index``: ``{layer: entry}``
    (−1 or a missing layer = unsteered there); ``steerers`` in bank order per layer."""
    layers = sorted({s.layer for s in steerers})
    ids = torch.tensor([prompt])
    with FusedSteerer.attach(model, steerers, mode="token", backend="reference",
                             index={layer: [index.get(layer, -1)] for layer in layers}), torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def hf_prompt_all(model, steerers, prompt, entry: int, new_tokens: int = NEW_TOKENS):
    """Greedy ``(tokens, log-probabilities of those tokens)`` under DESIGN's prompt mode (vector at
    every position) with ``FusedSteerer``."""
    ids = torch.tensor([prompt])
    with FusedSteerer.attach(model, steerers, mode="prompt", backend="reference", index=[entry],
                             prompt_positions="all"):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def hf_plain(model, prompt, new_tokens: int = NEW_TOKENS) -> list:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


# --------------------------------------------------------------------------------------------
# the child process
# --------------------------------------------------------------------------------------------

def tensor_parallel_size() -> int:
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


def _counters(llm) -> dict:
    out = {}
    for metric in llm.get_metrics():
        if metric.name in ("vllm:num_preemptions", "vllm:prefix_cache_hits") and hasattr(metric, "value"):
            out[metric.name] = out.get(metric.name, 0) + metric.value
    return out


def serve_main(job_path: str) -> None:
    """Child-process body: bad configurations first (each must fail before an engine starts), then
    one engine serving ``job["phases"]`` (each phase one ``generate`` call, after the previous one
    finished) and the ``bad_requests``. Writes tokens, counters and errors to ``job["out"]``."""
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams

    common = dict(model=job["model"], dtype="float32", gpu_memory_utilization=0.15, max_model_len=96, max_num_seqs=4,
                  max_num_batched_tokens=128, enforce_eager=True, seed=0, disable_log_stats=False)
    common.update(job.get("engine", {}))
    if common.get("tensor_parallel_size") == "auto":
        common["tensor_parallel_size"] = tensor_parallel_size()
    results = {"bad": {}, "phases": [], "counters": [], "bad_requests": []}
    for name, conf in job.get("bad", {}).items():
        t0 = time.perf_counter()
        try:
            LLM(**{**common, **conf.get("engine", {})}, additional_config=conf["config"])
            results["bad"][name] = {"error": None}
        except Exception as exc:  # the type and message are checked by the parent
            results["bad"][name] = {"type": type(exc).__name__, "error": str(exc),
                                    "seconds": time.perf_counter() - t0}
    llm = LLM(**common, additional_config=job["config"])

    def params(req):
        extra = {"finesteer": req["finesteer"]} if "finesteer" in req else None
        return SamplingParams(temperature=0.0, max_tokens=req.get("new_tokens", job["new_tokens"]), ignore_eos=True,
                              extra_args=extra, logprobs=0)

    def prompt(req):
        # "extend": [phase, request, n] = that request's prompt, its first n generated tokens, then
        # "prompt" (a follow-up turn).
        if "extend" not in req:
            return req["prompt"]
        p, i, n = req["extend"]
        return job["phases"][p][i]["prompt"] + results["phases"][p][i][:n] + req["prompt"]

    for phase in job["phases"]:
        outs = llm.generate([{"prompt_token_ids": prompt(r)} for r in phase], [params(r) for r in phase],
                            use_tqdm=False)
        results["phases"].append([list(o.outputs[0].token_ids) for o in outs])
        # The log-probability of each generated (greedy) token: a finer check than the tokens.
        results.setdefault("logprobs", []).append([[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids,
                                                                                  o.outputs[0].logprobs)]
                                                   for o in outs])
        results["counters"].append(_counters(llm))
    for value in job.get("bad_requests", []):
        try:
            llm.generate([{"prompt_token_ids": [5, 6]}], params({"finesteer": value}), use_tqdm=False)
            results["bad_requests"].append({"error": None})
        except Exception as exc:
            results["bad_requests"].append({"type": type(exc).__name__, "error": str(exc)})
    results["tensor_parallel_size"] = common.get("tensor_parallel_size", 1)
    results["additional_config"] = llm.llm_engine.vllm_config.additional_config
    Path(job["out"]).write_text(json.dumps(results))


def run_child(tmp: Path, job: dict, timeout: int = 900) -> dict:
    """Run :func:`serve_main` on ``job`` in a child python; its results (fails the test on error)."""
    job = {**job, "out": str(tmp / "out.json"), "new_tokens": job.get("new_tokens", NEW_TOKENS)}
    (tmp / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "import sys; from tests.vllm_tiny import serve_main; "
                           "serve_main(sys.argv[1])", str(tmp / "job.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        pytest.fail(f"vLLM child failed (rc {proc.returncode}) after {seconds:.0f} s:\n{proc.stderr[-6000:]}")
    results = json.loads((tmp / "out.json").read_text())
    results["seconds"] = seconds
    return results


def check_plugin_installed() -> None:
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.value.startswith("finesteer")]
    if not eps:
        pytest.fail("finesteer's 'vllm.general_plugins' entry point is not installed: add it to pyproject.toml "
                    "and reinstall finesteer (pip install -e .)")
