"""What only the ``cpu`` backend has: its build, the ISA choice of its inner loops, its thread
count, and the fallback when it cannot be built. Everything it shares with the other backends
(agreement with the reference, exactness, the index contract, opcheck, bad input) is in
``tests/test_backends.py``.

Nothing here builds the extension at import time: the tests that need it ask for the ``cpu``
fixture, which loads it (or skips with the reason) when the first such test runs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import finesteer

from .utils import TOLERANCES, assert_close_verbose, bank_index, check_against_reference, make_bank, random_h


@pytest.fixture(scope="module")
def cpu():
    from finesteer.fused.native import CPU

    ok, reason = CPU.available()
    if not ok:
        pytest.skip(f"cpu backend unavailable: {reason}")
    return CPU


def test_extension_builds_when_a_compiler_is_present():
    """With a compiler and the sources at hand the extension must build (not silently skip)."""
    from finesteer import _ext
    if shutil.which("c++") is None or not (_ext.CSRC / "cpu" / "steer_cpu.cpp").is_file():
        pytest.skip("no C++ compiler or no csrc/ checkout")
    ok, reason = _ext.load_cpu()
    assert ok, reason
    assert finesteer.backends()["cpu"].startswith("available")


def test_auto_backend_on_cpu_is_the_extension(cpu, monkeypatch):
    from finesteer._backends import ENV_VAR, get_backend
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert get_backend("auto", torch.device("cpu")) is cpu


def test_baseline_isa_path_matches(cpu, monkeypatch):
    """The portable (non-AVX2) build of the inner loops computes the same function."""
    bank = make_bank(1029, seed=5)
    h = random_h(21, 1029)
    idx = bank_index(21, 3, seed=2)
    check_against_reference(cpu, h, bank, idx, "default ISA")
    fast = cpu.steer_tokens(h, bank, idx)
    monkeypatch.setenv("FINESTEER_CPU_ISA", "baseline")
    check_against_reference(cpu, h, bank, idx, "baseline ISA")
    assert_close_verbose(cpu.steer_tokens(h, bank, idx), fast, *TOLERANCES[torch.float32], "baseline vs avx2")


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts(cpu, threads):
    """1 thread, and 2 (decode splits d across threads; prefill splits row blocks)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bank = make_bank(2048, seed=8)
        for T in (1, 4, 17):
            check_against_reference(cpu, random_h(T, 2048, seed=T), bank, bank_index(T, 3, seed=T),
                                    f"threads={threads}")
    finally:
        torch.set_num_threads(old)


_FALLBACK_SCRIPT = """
import torch, finesteer
from finesteer._backends import backends, get_backend
from tests.utils import random_steerer
b = backends()
print("CPU:", b["cpu"])
assert b["cpu"].startswith("unavailable"), b["cpu"]
assert get_backend("auto", torch.device("cpu")).NAME == "reference"
s = random_steerer(32, seed=0, gate_mode="off")
h = torch.randn(3, 32)
out = finesteer.steer(h, s, backend="auto")
assert out.shape == h.shape
try:
    finesteer.steer(h, s, backend="cpu")
except RuntimeError as exc:
    assert "unavailable" in str(exc)
else:
    raise AssertionError("backend='cpu' should raise when the extension is unavailable")
"""


@pytest.mark.parametrize("how", ["no_compiler", "disabled"])
def test_fallback_without_the_extension(tmp_path, how):
    """No compiler (and no cached build) or FINESTEER_DISABLE_EXT=1: the package still works on the
    reference, and finesteer.backends() says why the cpu backend is missing."""
    env = {**os.environ, "FINESTEER_BUILD_DIR": str(tmp_path / "build")}
    if how == "no_compiler":
        env["CXX"] = str(tmp_path / "no-such-compiler")
        expect = "no C++ compiler"
    else:
        env["FINESTEER_DISABLE_EXT"] = "1"
        expect = "FINESTEER_DISABLE_EXT=1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    if "prebuilt finesteer._C" not in res.stdout:  # an installed _C needs no compiler
        assert expect in res.stdout, res.stdout
