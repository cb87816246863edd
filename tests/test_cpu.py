"""The ``cpu`` backend (csrc/cpu/steer_cpu.cpp) against :mod:`finesteer.reference`.

Hard gates: a row whose SCS score lies within ``tests.utils.GATE_MARGIN`` of τ may legitimately open in one
implementation and stay closed in the other (the score differs by summation order, ~1e-7).
Such rows are excluded from the comparison (``decided_rows``); every other row must match, and
tests that check bit-identity use gates that are closed by a wide margin.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import finesteer
from finesteer import SteeringBank
from finesteer import reference as ref
from finesteer._constants import GATE_EPS
from finesteer.fused import cpu

from .utils import (TOLERANCES, assert_close_verbose, check_backend_against_reference, decided_rows,
                    random_steerer)

OK, REASON = cpu.available()


@pytest.fixture(autouse=True)
def _needs_extension(request):
    """Every test needs the built extension except the fallback tests, which run without it."""
    if not OK and not request.node.name.startswith("test_fallback"):
        pytest.skip(f"cpu backend unavailable: {REASON}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def test_extension_builds_when_a_compiler_is_present():
    """With a compiler and the sources at hand the extension must build (not silently skip)."""
    from finesteer import _ext
    if shutil.which("c++") is None or not (_ext.CSRC / "cpu" / "steer_cpu.cpp").is_file():
        pytest.skip("no C++ compiler or no csrc/ checkout")
    ok, reason = _ext.load_cpu()
    assert ok, reason
    assert finesteer.backends()["cpu"].startswith("available")


# ---- helpers ---------------------------------------------------------------------------------

def make_bank(d, r=5, K=3, H=17, m=3, modes=("hard", "soft", "off"), weight_dtype=torch.float32, seed=0,
              strength=1.0):
    steerers = [random_steerer(d, r=r, K=K, H=H, m=m, seed=seed + i, gate_mode=mode, strength=strength)
                for i, mode in enumerate(modes)]
    return SteeringBank.from_steerers(steerers, weight_dtype=weight_dtype)


def random_index(T, N, seed=0, with_none=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1 if with_none else 0, N, (T,), generator=g)


def check_against_reference(h, bank, index, what=""):
    return check_backend_against_reference(cpu, h, bank, index, what)


# ---- correctness sweeps -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 3, 64, 513])
@pytest.mark.parametrize("d", [64, 896, 2048, 4096])
def test_token_mode_matches_reference(d, T, dtype):
    bank = make_bank(d, seed=d + T)
    h = torch.randn(T, d).to(dtype)
    check_against_reference(h, bank, random_index(T, bank.num_steerers, seed=T), f"d={d} T={T} {dtype}")


@pytest.mark.parametrize("d", [1, 7, 67, 1029])
@pytest.mark.parametrize("sizes", [(1, 1, 1, 1), (7, 5, 33, 3), (3, 11, 129, 13), (16, 8, 256, 10)])
def test_odd_sizes(d, sizes):
    r, K, H, m = sizes
    bank = make_bank(d, r=min(r, d), K=K, H=H, m=m, seed=d)
    h = torch.randn(37, d)
    check_against_reference(h, bank, random_index(37, bank.num_steerers, seed=d), f"d={d} sizes={sizes}")


@pytest.mark.parametrize("mode", ["off", "hard", "soft"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_steerer_index_none(mode, dtype):
    bank = make_bank(256, modes=(mode,), seed=3)
    h = (torch.randn(50, 256) * 2).to(dtype)
    keep = check_against_reference(h, bank, None, f"mode={mode}")
    assert keep.sum() > 40


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_half_precision_weights(dtype, wdtype):
    bank = make_bank(896, weight_dtype=wdtype, seed=11)
    assert bank.A.dtype == wdtype and bank.B.dtype == wdtype and bank.W2.dtype == wdtype
    for T in (1, 9, 70):
        h = torch.randn(T, 896).to(dtype)
        check_against_reference(h, bank, random_index(T, 3, seed=T), f"weights {wdtype}, T={T}")


def test_baseline_isa_path_matches(monkeypatch):
    """The portable (non-AVX2) build of the inner loops computes the same function."""
    bank = make_bank(1029, seed=5)
    h = torch.randn(21, 1029)
    idx = random_index(21, 3, seed=2)
    fast = cpu.steer_tokens(h, bank, idx)
    monkeypatch.setenv("FINESTEER_CPU_ISA", "baseline")
    check_against_reference(h, bank, idx, "baseline ISA")
    slow = cpu.steer_tokens(h, bank, idx)
    keep = decided_rows(h, bank, idx)
    assert_close_verbose(slow[keep], fast[keep], *TOLERANCES[torch.float32], "baseline vs avx2")


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bank = make_bank(2048, seed=8)
        for T in (1, 4, 17):
            check_against_reference(torch.randn(T, 2048), bank, random_index(T, 3, seed=T), f"threads={threads}")
    finally:
        torch.set_num_threads(old)


def test_non_contiguous_input():
    bank = make_bank(128, seed=4)
    base = torch.randn(128, 40)
    h = base.t()  # [40, 128] with strides (1, 40)
    assert not h.is_contiguous()
    idx = random_index(40, 3, seed=9)
    check_against_reference(h, bank, idx, "transposed h")
    h2 = torch.randn(40, 256)[:, ::2]
    check_against_reference(h2, bank, idx, "strided h")
    idx_nc = torch.stack([idx, idx], 1)[:, 0]
    assert not idx_nc.is_contiguous()
    check_against_reference(h2, bank, idx_nc, "strided index")


def test_int32_and_int64_index_agree():
    bank = make_bank(96, seed=6)
    h = torch.randn(30, 96)
    idx = random_index(30, 3, seed=1)
    assert torch.equal(cpu.steer_tokens(h, bank, idx), cpu.steer_tokens(h, bank, idx.int()))


def test_empty_batch():
    bank = make_bank(64)
    h = torch.randn(0, 64)
    assert cpu.steer_tokens(h, bank, None).shape == (0, 64)
    assert cpu.steering_vectors(h, bank, torch.zeros(0, dtype=torch.long)).shape == (0, 64)


# ---- exactness: closed gates, index −1, add_vectors --------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_closed_gate_and_unindexed_rows_are_bit_identical(dtype):
    d, T = 512, 45
    open_ = random_steerer(d, seed=1, gate_mode="off")
    closed = random_steerer(d, seed=2, gate_mode="hard", threshold=2.0)  # scores are ≤ 1: never opens
    zero = random_steerer(d, seed=3, gate_mode="off", strength=0.0)
    bank = SteeringBank.from_steerers([open_, closed, zero])
    h = torch.randn(T, d).to(dtype)
    idx = torch.arange(T) % 4 - 1  # −1, 0, 1, 2, −1, ...
    out = cpu.steer_tokens(h, bank, idx)
    vec = cpu.steering_vectors(h, bank, idx)
    untouched = idx != 0
    assert torch.equal(out[untouched], h[untouched])
    assert torch.equal(vec[untouched], torch.zeros_like(vec[untouched]))
    assert not torch.equal(out[~untouched], h[~untouched])
    # The whole batch closed: the output is h, bit for bit.
    assert torch.equal(cpu.steer_tokens(h, bank, torch.ones(T, dtype=torch.long)), h)
    assert torch.equal(cpu.steer_tokens(h, bank, torch.full((T,), -1)), h)


def test_zero_vector_components_select_h():
    """Where only some components of a row's vector are zero, exactly those keep h's bits."""
    d = 64
    s = random_steerer(d, K=2, m=1, seed=4, gate_mode="off")
    bank = SteeringBank.from_steerers([s])
    bank.B[0, :, ::3] = 0.0  # every third output component is exactly 0
    h = torch.randn(9, d, dtype=torch.bfloat16)
    out = cpu.steer_tokens(h, bank, None)
    assert torch.equal(out[:, ::3], h[:, ::3])
    assert_close_verbose(out, ref.steer_tokens(h, bank, None), *TOLERANCES[torch.bfloat16], "partial zeros")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_vectors_is_exact(dtype):
    T, S, d = 23, 4, 300
    h = torch.randn(T, d).to(dtype)
    v = torch.randn(S, d)
    v[1, :50] = 0.0
    v[2] = 0.0
    slot = torch.randint(-1, S, (T,))
    slot[0] = -1
    for sl in (slot, slot.int()):
        out = cpu.add_vectors(h, v, sl)
        assert torch.equal(out, ref.add_vectors(h, v, sl))
    assert torch.equal(out[slot == -1], h[slot == -1])
    assert torch.equal(out[slot == 2], h[slot == 2])
    v_rows = torch.randn(T, d)
    assert torch.equal(cpu.add_vectors(h, v_rows, None), ref.add_vectors(h, v_rows, None))
    assert torch.equal(cpu.add_vectors(h.t().contiguous().t(), v_rows, None), ref.add_vectors(h, v_rows, None))


# ---- through the public API ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_steer_token_and_prompt_modes(dtype):
    d = 160
    steerers = [random_steerer(d, seed=20, gate_mode="soft"), random_steerer(d, seed=21, gate_mode="off")]
    bank = SteeringBank.from_steerers(steerers)
    atol, rtol = TOLERANCES[dtype]
    h = torch.randn(3, 7, d).to(dtype)
    index = torch.tensor([1, -1, 0])
    got = finesteer.steer(h, bank, mode="token", index=index, backend="cpu")
    exp = finesteer.steer(h, bank, mode="token", index=index, backend="reference")
    assert_close_verbose(got, exp, atol, rtol, "token mode via steer()")
    last = torch.tensor([6, 2, 4])
    got = finesteer.steer(h, bank, mode="prompt", index=index, last_index=last, backend="cpu")
    exp = finesteer.steer(h, bank, mode="prompt", index=index, last_index=last, backend="reference")
    assert_close_verbose(got, exp, atol, rtol, "prompt mode via steer()")
    assert torch.equal(got[1], h[1])  # index −1: the whole sequence untouched
    # A single Steerer (no bank) in prompt mode, 2-D input.
    got = finesteer.steer(h[0], steerers[1], mode="prompt", backend="cpu")
    exp = finesteer.steer(h[0], steerers[1], mode="prompt", backend="reference")
    assert_close_verbose(got, exp, atol, rtol, "prompt mode, one steerer")


def test_auto_backend_on_cpu_is_the_extension():
    from finesteer._backends import get_backend
    assert get_backend("auto", torch.device("cpu")).NAME == "cpu"


# ---- errors ---------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    bank = make_bank(64)
    h = torch.randn(5, 64)
    with pytest.raises(RuntimeError, match="hidden size mismatch"):
        cpu.steer_tokens(torch.randn(5, 65), bank, None)
    with pytest.raises(RuntimeError, match=r"index\[2\] = 3 is out of range"):
        cpu.steer_tokens(h, bank, torch.tensor([0, 1, 3, 0, 0]))
    with pytest.raises(RuntimeError, match="index must be int32 or int64"):
        cpu.steer_tokens(h, bank, torch.zeros(5))
    with pytest.raises(RuntimeError, match=r"index must have shape \[T\]"):
        cpu.steering_vectors(h, bank, torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="must be 2-D"):
        cpu.steer_tokens(h[None], bank, None)
    with pytest.raises(RuntimeError, match="h must be float32/bfloat16/float16"):
        cpu.steer_tokens(h.double(), bank, None)
    bad = SteeringBank(**{**bank.tensors(), "mu": bank.mu.double()}, r=bank.r, K=bank.K, H=bank.H, m=bank.m)
    with pytest.raises(RuntimeError, match="must be float32"):
        cpu.steer_tokens(h, bad, None)
    bad = SteeringBank(**{**bank.tensors(), "B": bank.B.half()}, r=bank.r, K=bank.K, H=bank.H, m=bank.m)
    with pytest.raises(RuntimeError, match="share one weight dtype"):
        cpu.steer_tokens(h, bad, None)
    bad = SteeringBank(**{**bank.tensors(), "A": bank.A.transpose(1, 2).contiguous().transpose(1, 2)},
                       r=bank.r, K=bank.K, H=bank.H, m=bank.m)
    with pytest.raises(RuntimeError, match="A must be contiguous"):
        cpu.steer_tokens(h, bad, None)
    with pytest.raises(RuntimeError, match=r"slot\[1\] = 7 is out of range"):
        cpu.add_vectors(h, torch.randn(2, 64), torch.tensor([0, 7, -1, 0, 1]))
    with pytest.raises(RuntimeError, match="vectors must be float32"):
        cpu.add_vectors(h, torch.randn(5, 64).half(), None)
    with pytest.raises(RuntimeError, match="without slot, vectors must have one row per row of h"):
        cpu.add_vectors(h, torch.randn(2, 64), None)


# ---- operator registration ------------------------------------------------------------------------

def test_opcheck_schema_and_fake_kernels():
    bank = make_bank(32, modes=("soft",))
    h = torch.randn(6, 32, dtype=torch.bfloat16)
    args = (h, bank.A, bank.B, bank.W2, bank.mu, bank.c, bank.b1, bank.b2, bank.gate_mode, bank.threshold,
            bank.temperature, bank.strength, torch.tensor([0, -1, 0, 0, -1, 0]), GATE_EPS)
    ops = torch.ops.finesteer_ext
    torch.library.opcheck(ops.steer_tokens.default, args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.steering_vectors.default, args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.add_vectors.default, (h, torch.randn(2, 32), torch.tensor([0, 1, -1, 0, 1, 1])),
                          test_utils=("test_schema", "test_faketensor"))


# ---- property test ----------------------------------------------------------------------------------

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(T=st.integers(1, 40), d=st.integers(1, 300), r=st.integers(1, 9), K=st.integers(1, 9),
           H=st.integers(1, 70), m=st.integers(1, 9), n_steerers=st.integers(1, 3),
           dtype=st.sampled_from(DTYPES), wdtype=st.sampled_from(DTYPES), use_index=st.booleans(),
           seed=st.integers(0, 2 ** 16))
    def test_property_matches_reference(T, d, r, K, H, m, n_steerers, dtype, wdtype, use_index, seed):
        modes = ("hard", "soft", "off")[:n_steerers]
        bank = make_bank(d, r=min(r, d), K=K, H=H, m=m, modes=modes, weight_dtype=wdtype, seed=seed)
        g = torch.Generator().manual_seed(seed)
        h = (torch.randn(T, d, generator=g) * 3).to(dtype)
        index = torch.randint(-1, n_steerers, (T,), generator=g) if use_index else None
        check_against_reference(h, bank, index, f"T={T} d={d} r={r} K={K} H={H} m={m}")


# ---- without the extension ----------------------------------------------------------------------

_FALLBACK_SCRIPT = """
import torch, finesteer
from finesteer._backends import backends, get_backend
from finesteer import SteeringBank
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


def test_traces_under_torch_compile_without_graph_breaks():
    bank = make_bank(48, modes=("soft",))
    h = torch.randn(5, 48)
    idx = torch.tensor([0, -1, 0, 0, 0])

    def f(x):
        return cpu.steer_tokens(x, bank, idx) * 2.0

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(h), f(h))
