"""The ``cuda`` backend (csrc/cuda/) against :mod:`finesteer.reference` on a GPU.

Skipped cleanly without a CUDA device or without the built extension (the skip reason says
which). Hard gates: rows whose SCS score lies within ``tests.utils.GATE_MARGIN`` of τ may legitimately flip
between implementations (summation order); they are excluded from comparisons, and the
bit-identity tests use gates closed by a wide margin.

On a GPU machine: ``python -m pytest tests/test_cuda.py -q`` (the first call builds the
extension from csrc/ unless ``pip install -e . --no-build-isolation`` already did).
"""
from __future__ import annotations

import pytest
import torch

import finesteer
from finesteer import SteeringBank
from finesteer import reference as ref
from finesteer._constants import GATE_EPS

from .utils import (TOLERANCES, assert_close_verbose, check_backend_against_reference, decided_rows,
                    random_steerer)

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from finesteer.fused import cuda  # noqa: E402

OK, REASON = cuda.available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not OK, reason=f"cuda backend unavailable: {REASON}")]

DEV = torch.device("cuda")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_bank(d, r=5, K=3, H=17, m=3, modes=("hard", "soft", "off"), weight_dtype=torch.float32, seed=0,
              strength=1.0):
    steerers = [random_steerer(d, r=r, K=K, H=H, m=m, seed=seed + i, gate_mode=mode, strength=strength)
                for i, mode in enumerate(modes)]
    return SteeringBank.from_steerers(steerers, device=DEV, weight_dtype=weight_dtype)


def random_index(T, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, N, (T,), generator=g).to(DEV)


def check_against_reference(h, bank, index, what=""):
    return check_backend_against_reference(cuda, h, bank, index, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 2, 3, 16, 17, 64, 513])
@pytest.mark.parametrize("d", [64, 896, 4096])
def test_token_mode_matches_reference(d, T, dtype):
    bank = make_bank(d, seed=d + T)
    h = torch.randn(T, d, device=DEV).to(dtype)
    check_against_reference(h, bank, random_index(T, bank.num_steerers, seed=T), f"d={d} T={T} {dtype}")


@pytest.mark.parametrize("d", [1, 67, 1029])
@pytest.mark.parametrize("sizes", [(1, 1, 1, 1), (7, 5, 33, 3), (3, 40, 600, 37), (16, 8, 256, 10)])
def test_odd_sizes(d, sizes):
    """J > 512 (several column passes in phase 1) and K > 32 (several lanes per expert) included."""
    r, K, H, m = sizes
    bank = make_bank(d, r=min(r, d), K=K, H=H, m=m, seed=d)
    h = torch.randn(37, d, device=DEV)
    check_against_reference(h, bank, random_index(37, bank.num_steerers, seed=d), f"d={d} sizes={sizes}")


@pytest.mark.parametrize("mode", ["off", "hard", "soft"])
def test_single_steerer_index_none(mode):
    bank = make_bank(256, modes=(mode,), seed=3)
    for T in (1, 5, 100):
        check_against_reference(torch.randn(T, 256, device=DEV) * 2, bank, None, f"mode={mode} T={T}")


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_half_precision_weights(dtype, wdtype):
    bank = make_bank(4096, r=16, K=8, H=256, m=10, weight_dtype=wdtype, seed=11)
    for T in (1, 8, 64):
        h = torch.randn(T, 4096, device=DEV).to(dtype)
        check_against_reference(h, bank, random_index(T, 3, seed=T), f"weights {wdtype}, T={T}")


def test_many_steerers_and_int32_index():
    bank = make_bank(512, modes=("soft", "off") * 4, seed=30)
    h = torch.randn(70, 512, device=DEV)
    idx = random_index(70, 8, seed=4)
    check_against_reference(h, bank, idx, "bank of 8")
    assert torch.equal(cuda.steer_tokens(h, bank, idx), cuda.steer_tokens(h, bank, idx.int()))


def test_strided_rows():
    bank = make_bank(128, seed=4)
    h = torch.randn(40, 256, device=DEV)[:, :128]  # row stride 256, rows contiguous
    check_against_reference(h, bank, random_index(40, 3, seed=9), "row stride")
    ht = torch.randn(128, 40, device=DEV).t()  # not row-contiguous: copied by the binding
    check_against_reference(ht, bank, random_index(40, 3, seed=9), "transposed")


def test_more_rows_than_a_grid_dimension():
    """T > 65535 exercises the grid-stride loops over rows and row tiles."""
    bank = make_bank(32, modes=("soft",), seed=2)
    h = torch.randn(70_000, 32, device=DEV, dtype=torch.bfloat16)
    check_against_reference(h, bank, None, "T=70000")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_closed_gate_and_unindexed_rows_are_bit_identical(dtype):
    d, T = 512, 45
    bank = SteeringBank.from_steerers([random_steerer(d, seed=1, gate_mode="off"),
                                       random_steerer(d, seed=2, gate_mode="hard", threshold=2.0),
                                       random_steerer(d, seed=3, gate_mode="off", strength=0.0)], device=DEV)
    h = torch.randn(T, d, device=DEV).to(dtype)
    idx = (torch.arange(T, device=DEV) % 4) - 1
    out = cuda.steer_tokens(h, bank, idx)
    vec = cuda.steering_vectors(h, bank, idx)
    untouched = idx != 0
    assert torch.equal(out[untouched], h[untouched])
    assert torch.equal(vec[untouched], torch.zeros_like(vec[untouched]))
    assert not torch.equal(out[~untouched], h[~untouched])
    # Out-of-range indices act as −1 on the device (no sync to check them).
    assert torch.equal(cuda.steer_tokens(h, bank, torch.full((T,), 7, device=DEV)), h)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_vectors_is_exact(dtype):
    T, S, d = 23, 4, 300
    h = torch.randn(T, d, device=DEV).to(dtype)
    v = torch.randn(S, d, device=DEV)
    v[1, :50] = 0.0
    v[2] = 0.0
    slot = torch.randint(-1, S, (T,), device=DEV)
    for sl in (slot, slot.int()):
        assert torch.equal(cuda.add_vectors(h, v, sl), ref.add_vectors(h, v, sl))
    v_rows = torch.randn(T, d, device=DEV)
    assert torch.equal(cuda.add_vectors(h, v_rows, None), ref.add_vectors(h, v_rows, None))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_steer_both_modes(dtype):
    d = 160
    bank = SteeringBank.from_steerers([random_steerer(d, seed=20, gate_mode="soft"),
                                       random_steerer(d, seed=21, gate_mode="off")], device=DEV)
    h = torch.randn(3, 7, d, device=DEV).to(dtype)
    index = torch.tensor([1, -1, 0], device=DEV)
    atol, rtol = TOLERANCES[dtype]
    for mode in ("token", "prompt"):
        got = finesteer.steer(h, bank, mode=mode, index=index, backend="cuda")
        exp = finesteer.steer(h, bank, mode=mode, index=index, backend="reference")
        assert_close_verbose(got, exp, atol, rtol, f"{mode} mode via steer()")


def test_cuda_graph_capture_and_replay():
    bank = make_bank(1024, r=16, K=8, H=256, m=10, seed=40)
    h = torch.randn(4, 1024, device=DEV, dtype=torch.bfloat16)
    idx = torch.tensor([0, 1, 2, -1], device=DEV)
    cuda.steer_tokens(h, bank, idx)  # warm up (build, allocator)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda.steer_tokens(h, bank, idx)
    h.copy_(torch.randn_like(h))
    bank.strength.mul_(0.5)  # picked up by the replay without re-capture
    graph.replay()
    torch.cuda.synchronize()
    keep = decided_rows(h, bank, idx)
    assert_close_verbose(out[keep], ref.steer_tokens(h, bank, idx)[keep], *TOLERANCES[torch.bfloat16], "graph replay")


def test_opcheck_fake_kernels():
    bank = make_bank(32, modes=("soft",))
    h = torch.randn(6, 32, device=DEV, dtype=torch.float16)
    args = (h, bank.A, bank.B, bank.W2, bank.mu, bank.c, bank.b1, bank.b2, bank.gate_mode, bank.threshold,
            bank.temperature, bank.strength, torch.tensor([0, -1, 0, 0, -1, 0], device=DEV), GATE_EPS)
    for op in (torch.ops.finesteer_ext.steer_tokens.default, torch.ops.finesteer_ext.steering_vectors.default):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_raise_clear_errors():
    bank = make_bank(64)
    h = torch.randn(5, 64, device=DEV)
    with pytest.raises(RuntimeError, match="hidden size mismatch"):
        cuda.steer_tokens(torch.randn(5, 65, device=DEV), bank, None)
    with pytest.raises(RuntimeError, match="is on cpu but h is on cuda"):
        cuda.steer_tokens(h, bank, torch.zeros(5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="index must be int32 or int64"):
        cuda.steer_tokens(h, bank, torch.zeros(5, device=DEV))
    cpu_bank = bank.to("cpu")
    with pytest.raises(RuntimeError, match="but h is on cuda"):
        cuda.steer_tokens(h, cpu_bank, None)
