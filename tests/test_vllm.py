"""The vLLM plugin on a real engine (vLLM's CPU build): per-request steerer choice and prompt mode.

Each module fixture serves the tiny Llama of :mod:`tests.vllm_tiny` once, in a child process,
and the tests compare its greedy tokens with HuggingFace on the same weights:

- token mode, a bank of two steerers at layer 0 plus one at layer 1, a mixed batch choosing
  steerer 0, steerer 1, two layers and none: equal to ``FusedSteerer(mode="token")`` with the
  same per-row index (itself checked against the reference in tests/test_hf.py), and different
  from unsteered;
- prompt mode ("from_last"), eager and compiled, with prompts split by a small
  ``max_num_batched_tokens`` (chunked prefill, including a one-token final chunk), prefix-cache
  hits across requests steered differently, and preemption forced by a small KV cache
  (``num_gpu_blocks_override``): equal to :func:`tests.test_hf_from_last.generate_from_last_definition`;
- prompt mode "all" with chunked prefill and prefix caching off: equal to ``FusedSteerer``
  prompt mode (DESIGN §4).

The counters prove the conditions happened (prefix-cache hits, preemptions).
"""
from __future__ import annotations

import re

import pytest

from tests.test_hf_from_last import generate_from_last_definition
from tests.utils import random_steerer
from tests.vllm_tiny import (
    LAYERS,
    TRIGGER,
    build_model_dir,
    build_steerer,
    check_plugin_installed,
    hf_plain,
    hf_prompt_all,
    hf_token_mode,
    load_hf,
    needs_vllm,
    run_child,
)

pytestmark = needs_vllm

STEERED = [5, 17, 42, 9, TRIGGER]       # ends in the trigger: its row opens the gate
BENIGN = [7, 8, 30, 61, 3, 12]          # no trigger: every row's gate stays closed
PREFIX = [3 + (7 * i) % 90 for i in range(32)]  # one 32-token KV block shared by several prompts


def test_this_vllm_has_every_function_the_plugin_hooks():
    """The installed vLLM (the tested release) has every private function the plugin wraps, so
    register() hooks them all and configured steering is not refused."""
    import importlib

    from finesteer.integrations import vllm as fv

    fv.register()
    assert fv.missing_hooks() == []
    fv.check_vllm_hooks()
    vllm = importlib.import_module("vllm")
    assert vllm.__version__.startswith(fv.TESTED_VLLM + "."), vllm.__version__


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    check_plugin_installed()
    tmp = tmp_path_factory.mktemp("vllm")
    model_dir = build_model_dir(tmp / "tiny-llama")
    # "c" (layer 1) has no gate: after layer 0's steering the trigger row's stream has left the
    # trigger direction, so a trigger gate there would stay closed and test nothing.
    a, b, c = build_steerer(0, seed=3), build_steerer(0, seed=5), build_steerer(1, seed=7, gated=False)
    paths = {}
    for name, st in (("a", a), ("b", b), ("c", c)):
        paths[name] = str(tmp / f"{name}.safetensors")
        st.save(paths[name])
    return {"tmp": tmp, "model_dir": model_dir, "steerers": {"a": a, "b": b, "c": c}, "paths": paths,
            "hf": load_hf(model_dir)}


# --------------------------------------------------------------------------------------------
# token mode: per-request choice in a mixed batch, tensor parallel where possible
# --------------------------------------------------------------------------------------------

TOKEN_REQUESTS = [
    {"prompt": STEERED, "finesteer": "a"},
    {"prompt": STEERED, "finesteer": "b"},
    {"prompt": STEERED},                        # names none, no default: unsteered
    {"prompt": STEERED, "finesteer": ["b", "c"]},
    {"prompt": BENIGN, "finesteer": "a"},       # gate closed on every row
    {"prompt": STEERED, "finesteer": "none"},
]


@pytest.fixture(scope="module")
def token_run(files, tmp_path_factory):
    tmp, paths = tmp_path_factory.mktemp("token"), files["paths"]
    small = tmp / "small.safetensors"
    random_steerer(64, layer=0).save(small)
    deep = tmp / "deep.safetensors"
    random_steerer(128, layer=LAYERS + 3).save(deep)
    conf = {"finesteer": {"steerers": [paths["a"], paths["b"], paths["c"]], "mode": "token", "backend": "reference"}}
    job = {
        "model": str(files["model_dir"]), "engine": {"tensor_parallel_size": "auto"}, "config": conf,
        "phases": [TOKEN_REQUESTS], "bad_requests": ["zzz", ["a", "b"]],
        "bad": {
            "missing": {"config": {"finesteer": {"steerers": [str(tmp / "nope.safetensors")]}}},
            "hidden": {"config": {"finesteer": {"steerers": [str(small)]}}},
            "layer": {"config": {"finesteer": {"steerers": [str(deep)]}}},
            "all_chunked": {"config": {"finesteer": {"steerers": [paths["a"]], "mode": "prompt",
                                                      "prompt_positions": "all"}}},
        },
    }
    return run_child(tmp, job)


def test_token_mode_mixed_batch_matches_hf(files, token_run):
    hf, st = files["hf"], files["steerers"]
    bank = [st["a"], st["b"], st["c"]]
    want = [
        hf_token_mode(hf, bank, STEERED, {0: 0}),
        hf_token_mode(hf, bank, STEERED, {0: 1}),
        hf_plain(hf, STEERED),
        hf_token_mode(hf, bank, STEERED, {0: 1, 1: 0}),
        hf_plain(hf, BENIGN),
        hf_plain(hf, STEERED),
    ]
    # Preconditions that make the comparison meaningful: each choice changes the tokens.
    assert len({tuple(w) for w in want[:4]}) == 4, f"choices must generate differently: {want[:4]}"
    assert hf_token_mode(hf, bank, BENIGN, {0: 0}) == want[4], "the benign prompt's gate must stay closed"
    got = token_run["phases"][0]
    tp = token_run["tensor_parallel_size"]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"request {i} {TOKEN_REQUESTS[i]}: vLLM (TP={tp}) {g} != HF {w}"


def test_fingerprint_is_in_the_engine_config(files, token_run):
    """The front end wrote the files' fingerprint where vLLM's compilation-cache key reads it."""
    from finesteer.integrations import vllm as fv

    served = token_run["additional_config"]["finesteer"]
    assert served["fingerprint"] == fv.fingerprint(fv.parse_config({"finesteer": {
        k: v for k, v in served.items() if k != "fingerprint"}}))


def test_unknown_steerer_name_is_rejected_before_serving(token_run):
    unknown, two = token_run["bad_requests"]
    assert unknown["type"] == "VLLMValidationError", unknown
    assert "unknown steerer name 'zzz'" in unknown["error"] and "served: a, b, c" in unknown["error"], unknown
    assert two["type"] == "VLLMValidationError" and "both at layer 0" in two["error"], two


@pytest.mark.parametrize("name, message", [
    ("missing", r"finesteer vLLM plugin: steerer file '.*nope\.safetensors' does not exist"),
    ("hidden", r"finesteer vLLM plugin: steerer '.*small\.safetensors' was fitted for hidden size 64, "
               r"but model '.*' has hidden size 128"),
    ("layer", rf"finesteer vLLM plugin: steerer '.*deep\.safetensors' is bound to layer {LAYERS + 3}, "
              rf"but model '.*' has {LAYERS} decoder layers"),
    ("all_chunked", r"finesteer vLLM plugin: prompt_positions 'all' needs each prompt computed in one step: "
                    r"start vLLM with enable_chunked_prefill=False"),
])
def test_bad_config_fails_before_serving(token_run, name, message):
    bad = token_run["bad"][name]
    assert bad["error"] is not None, f"LLM(...) with the {name!r} configuration started instead of failing"
    assert bad["type"] == "FineSteerConfigError", bad
    assert re.search(message, bad["error"]) and "\n" not in bad["error"], bad["error"]
    # Raised in the front end while vLLM builds its config, before any engine process starts
    # (starting one takes tens of seconds on these CPUs).
    assert bad["seconds"] < 10, f"the error came after {bad['seconds']:.1f} s: was an engine started?"


# --------------------------------------------------------------------------------------------
# prompt mode "from_last": chunked prefill, prefix caching, preemption; eager and compiled
# --------------------------------------------------------------------------------------------

LONG = [[20 + (3 * i + 11 * j) % 70 for i in range(30)] + [TRIGGER] for j in range(4)]
PROMPT_PHASES = [
    # 1. Seeds the prefix cache with PREFIX's block (computed unsteered: before the last token).
    [{"prompt": PREFIX + [40, 41, TRIGGER], "finesteer": "a"}],
    # 2. Prefix-cache hits, steered differently; PREFIX + [TRIGGER] then computes one token only.
    [{"prompt": PREFIX + [40, 41, TRIGGER], "finesteer": "b"},
     {"prompt": PREFIX + [TRIGGER], "finesteer": "a"},
     {"prompt": PREFIX + [50, TRIGGER]},
     {"prompt": STEERED, "finesteer": "b"}],
    # 3. Four 31-token prompts (chunks of 16 + 15) with a KV cache too small for all: preemption.
    [{"prompt": LONG[0], "finesteer": "a"}, {"prompt": LONG[1], "finesteer": "b"},
     {"prompt": LONG[2], "finesteer": "a"}, {"prompt": LONG[3]}],
    # 4. 33 + 40 tokens: its second block (positions 32..63: the last prompt token and 31 steered
    #    outputs) is full and cached.
    [{"prompt": PREFIX + [TRIGGER], "finesteer": "a", "new_tokens": 40}],
    # 5. A follow-up turn (phase 4's prompt, 32 of its outputs, the trigger: 66 tokens) containing
    #    that block. Its positions 32..63 are prompt positions before its last token, so unsteered:
    #    the steered block must not be reused (the plugin's prefix-cache key), only the first one.
    [{"extend": [3, 0, 32], "prompt": [TRIGGER], "finesteer": "a"}],
]
# vLLM's CPU attention needs blocks of a multiple of 32 tokens. Phase 3 needs 8 blocks, 6 exist.
PROMPT_ENGINE = {"max_num_batched_tokens": 16, "block_size": 32, "num_gpu_blocks_override": 6,
                 "enable_prefix_caching": True, "enable_chunked_prefill": True}
CHOICE = {"a": 0, "b": 1, None: -1}
# Prompt mode adds the vector to every generated token: at λ = 1 these steerers saturate the
# tiny model (one token repeated, log-probability ≈ 0), which would hide a misplaced vector.
PROMPT_STRENGTH = 0.3
LOGPROB_ATOL = 2e-3   # fp32 model; vLLM's CPU attention and HF's differ in summation order


def _prompt_job(files, compiled: bool) -> dict:
    paths = files["paths"]
    return {"model": str(files["model_dir"]), "phases": PROMPT_PHASES,
            "engine": {**PROMPT_ENGINE, "enforce_eager": not compiled},
            "config": {"finesteer": {"steerers": [{"path": paths[n], "strength": PROMPT_STRENGTH} for n in "ab"],
                                     "mode": "prompt", "backend": "reference"}}}


def _with_strength(steerer, strength):
    import copy
    out = copy.deepcopy(steerer)
    out.strength = strength
    return out


def _check_prompt_run(files, run, label):
    hf, st = files["hf"], files["steerers"]
    bank = [_with_strength(st["a"], PROMPT_STRENGTH), _with_strength(st["b"], PROMPT_STRENGTH)]
    hits = run["counters"][1].get("vllm:prefix_cache_hits", 0) - run["counters"][0].get("vllm:prefix_cache_hits", 0)
    assert hits >= 32 * 3, f"{label}: phase 2 should hit PREFIX's cached block, hits {hits}"
    assert run["counters"][2].get("vllm:num_preemptions", 0) > 0, f"{label}: no preemption: {run['counters']}"
    hits5 = run["counters"][4].get("vllm:prefix_cache_hits", 0) - run["counters"][3].get("vllm:prefix_cache_hits", 0)
    assert hits5 == 32, f"{label}: phase 5 must reuse only the unsteered first block, hit {hits5} tokens"
    for p, (phase, got, got_lp) in enumerate(zip(PROMPT_PHASES, run["phases"], run["logprobs"])):
        for i, (req, g, g_lp) in enumerate(zip(phase, got, got_lp)):
            entry = CHOICE[req.get("finesteer")]
            if "extend" in req:
                q, j, n = req["extend"]
                prompt = PROMPT_PHASES[q][j]["prompt"] + run["phases"][q][j][:n] + req["prompt"]
            else:
                prompt = req["prompt"]
            want, want_lp = generate_from_last_definition(hf, bank, prompt, len(g), entry, with_logprobs=True)
            where = f"{label}: phase {p + 1} request {i} ({req.get('finesteer')})"
            assert g == want, f"{where}: vLLM {g} != HF {want}"
            diff = max(abs(x - y) for x, y in zip(g_lp, want_lp))
            assert diff < LOGPROB_ATOL, f"{where}: log-probabilities differ by {diff:.2e}: {g_lp} vs {want_lp}"
            if entry >= 0:
                plain = generate_from_last_definition(hf, bank, prompt, len(g), -1)
                assert g != plain, f"{label}: phase {p + 1} request {i}: steering changed nothing"


@pytest.fixture(scope="module")
def prompt_eager_run(files, tmp_path_factory):
    return run_child(tmp_path_factory.mktemp("prompt_eager"), _prompt_job(files, compiled=False))


@pytest.fixture(scope="module")
def prompt_compiled_run(files, tmp_path_factory):
    return run_child(tmp_path_factory.mktemp("prompt_compiled"), _prompt_job(files, compiled=True))


def test_prompt_mode_matches_hf_from_last_eager(files, prompt_eager_run):
    _check_prompt_run(files, prompt_eager_run, "eager")


def test_prompt_mode_matches_hf_from_last_compiled(files, prompt_compiled_run):
    _check_prompt_run(files, prompt_compiled_run, "compiled")


# --------------------------------------------------------------------------------------------
# prompt mode "all" (DESIGN §4 exactly) with the whole prompt in one step
# --------------------------------------------------------------------------------------------

def test_prompt_mode_all_matches_hf(files, tmp_path_factory):
    paths, hf, st = files["paths"], files["hf"], files["steerers"]
    requests = [{"prompt": STEERED, "finesteer": "a"}, {"prompt": PREFIX + [TRIGGER], "finesteer": "b"},
                {"prompt": STEERED}]
    job = {"model": str(files["model_dir"]), "phases": [requests],
           "engine": {"enable_chunked_prefill": False, "enable_prefix_caching": False},
           "config": {"finesteer": {"steerers": [{"path": paths[n], "strength": PROMPT_STRENGTH} for n in "ab"],
                                    "mode": "prompt", "prompt_positions": "all", "default": "none",
                                    "backend": "reference"}}}
    run = run_child(tmp_path_factory.mktemp("prompt_all"), job)
    bank = [_with_strength(st["a"], PROMPT_STRENGTH), _with_strength(st["b"], PROMPT_STRENGTH)]
    want = [hf_prompt_all(hf, bank, STEERED, 0), hf_prompt_all(hf, bank, PREFIX + [TRIGGER], 1),
            hf_prompt_all(hf, bank, STEERED, -1)]
    from_last = generate_from_last_definition(hf, bank, STEERED, 10, 0, with_logprobs=True)
    assert want[0][0] != want[2][0], "'all' must change the tokens of this prompt"
    assert max(abs(x - y) for x, y in zip(want[0][1], from_last[1])) > 1e-2, "'all' must differ from 'from_last'"
    for i, ((tokens, logprobs), g, g_lp) in enumerate(zip(want, run["phases"][0], run["logprobs"][0])):
        assert g == tokens, f"request {i}: vLLM {g} != HF {tokens}"
        diff = max(abs(x - y) for x, y in zip(g_lp, logprobs))
        assert diff < LOGPROB_ATOL, f"request {i}: log-probabilities differ by {diff:.2e}"
