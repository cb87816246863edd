"""The Triton backend against the reference operator (:mod:`finesteer.reference`).

Runs compiled on a CUDA device, otherwise on CPU tensors through Triton's interpreter. Triton
decides interpreted-vs-compiled when the kernels are *decorated*, so ``TRITON_INTERPRET=1`` must
be in the environment before :mod:`finesteer._triton.steer` is first imported. Without CUDA this
module sets it itself at collection time (pytest imports every test module before running any
test, and nothing imports the kernels at import time); if the kernels were nevertheless already
imported compiled on a machine without CUDA, the module is skipped with that reason. CI may also
simply export ``TRITON_INTERPRET=1`` for the whole run: nothing else in the package uses Triton.

Hard gate: a row whose score lies within float rounding of τ may legitimately be gated
differently by two summation orders. ``separate_thresholds`` therefore moves each hard-gated
steerer's τ into the widest gap between the row scores (computed in fp64 from the very values
the kernels read) near their median, so about half the rows are gated off, half on, and no score
is within ~1e-4·τ of τ; every row is then compared, none excluded.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available() and "finesteer._triton.steer" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import finesteer as fs  # noqa: E402
from finesteer import _backends, reference  # noqa: E402
from finesteer._constants import GATE_EPS, GATE_HARD  # noqa: E402
from finesteer.fused import triton as triton_backend  # noqa: E402
from finesteer.bank import SteeringBank  # noqa: E402
from tests.utils import TOLERANCES, assert_close_verbose, random_steerer  # noqa: E402

_ok, _why = triton_backend.available()
if not _ok:
    pytest.skip(f"Triton backend unavailable: {_why}", allow_module_level=True)

from finesteer._triton import steer as k  # noqa: E402

DEV = torch.device("cpu" if k.INTERPRETED else "cuda")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The launchers' GPU block configuration (16-row blocks, narrow d tiles, 16-unit epilogue
#: steps), forced on small shapes so the interpreter also walks the GPU's loop structure.
GPU_CONFIG = dict(BLOCK_T=16, BLOCK_D=16, BLOCK_DO=64, BLOCK_H=16, BLOCK_HE=16, num_warps=4, num_stages=1)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def make_bank(d: int, specs=None, weight_dtype=torch.float32, seed: int = 0) -> SteeringBank:
    """A bank of steerers of *different* odd sizes (so every kind of padding is exercised).

    Default: 0 = hard gate (r3 K5 H37 m3), 1 = soft gate (r6 K2 H20 m1), 2 = no gate (K3 H17 m2).
    """
    if specs is None:
        specs = [dict(r=3, K=5, H=37, m=3, gate_mode="hard"),
                 dict(r=6, K=2, H=20, m=1, gate_mode="soft", temperature=0.01),
                 dict(r=2, K=3, H=17, m=2, with_gate=False)]
    steerers = [random_steerer(d, seed=seed + i, **spec) for i, spec in enumerate(specs)]
    return SteeringBank.from_steerers(steerers, device=DEV, weight_dtype=weight_dtype)


def scores64(h: torch.Tensor, bank: SteeringBank, n: int) -> torch.Tensor:
    """SCS scores of every row of ``h`` for steerer ``n``, in fp64 from the values the kernels read."""
    P = bank.A[n, :, :bank.r].double().cpu()
    hc = h.double().cpu() - bank.mu[n].double().cpu()
    return (hc @ P).square().sum(-1) / (hc.square().sum(-1) + GATE_EPS)


def separate_thresholds(bank: SteeringBank, h: torch.Tensor, index) -> None:
    """Move every hard-gated steerer's τ into a wide gap of its rows' scores (see module doc)."""
    for n in range(bank.num_steerers):
        if int(bank.gate_mode[n]) != GATE_HARD:
            continue
        rows = torch.ones(h.shape[0], dtype=torch.bool) if index is None else (index.cpu() == n)
        s = scores64(h, bank, n)[rows].sort().values
        if s.numel() == 0:
            continue
        if s.numel() == 1:
            tau = float(s[0]) * (0.5 if n % 2 == 0 else 2.0)
        else:
            lo, hi = s.numel() // 4, max(s.numel() // 4 + 1, (3 * s.numel()) // 4)
            gaps = s[lo + 1:hi + 1] - s[lo:hi]
            j = int(gaps.argmax())
            tau = float(s[lo + j] + s[lo + j + 1]) / 2
            assert float(gaps[j]) > 2e-4 * tau, "test inputs too dense to separate the hard gate"
        bank.threshold[n] = tau


def cyclic_index(T: int, N: int, dtype=torch.int64) -> torch.Tensor:
    """0, 1, …, N−1, −1, 0, 1, … (row 0 always steered)."""
    idx = torch.arange(T) % (N + 1)
    return torch.where(idx == N, -1, idx).to(dtype).to(DEV)


def rand_h(T: int, d: int, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(T, d, generator=g).to(dtype).to(DEV)


def check_against_reference(h, bank, index, split_d=None, config=None, what=""):
    """steering_vectors and steer_tokens vs the reference; closed / unsteered rows bit-identical.

    Returns the boolean mask of rows the reference leaves unsteered (vector exactly 0)."""
    separate_thresholds(bank, h, index)
    what = f"{what} T={h.shape[0]} d={h.shape[1]} {h.dtype} w={bank.weight_dtype} split={split_d}"

    vec = k.steering_vectors_forward(h, bank, index, split_d=split_d, config=config)
    vec_ref = reference.steering_vectors(h, bank, index)
    assert vec.dtype == torch.float32 and vec.shape == h.shape
    # Vectors are fp32 computed from the same (upcast) values: only summation order differs,
    # whatever the I/O dtype, so the fp32 tolerance applies.
    assert_close_verbose(vec, vec_ref, *TOLERANCES[torch.float32], what=what + " vectors")
    closed = (vec_ref == 0).all(-1)
    assert torch.equal((vec == 0).all(-1), closed), f"{what}: gate decisions differ"
    if index is not None:
        assert bool((vec[index == -1] == 0).all()), f"{what}: index −1 rows have non-zero vectors"

    out = k.steer_tokens_forward(h, bank, index, split_d=split_d, config=config)
    out_ref = reference.steer_tokens(h, bank, index)
    assert out.dtype == h.dtype and out.shape == h.shape
    assert_close_verbose(out, out_ref, *TOLERANCES[h.dtype], what=what + " steer_tokens")
    assert torch.equal(out[closed], h[closed]), f"{what}: closed-gate / unsteered rows are not bit-identical"
    return closed


# ----------------------------------------------------------------------------------------------
# token mode and vectors
# ----------------------------------------------------------------------------------------------

# Full cross-product on the small shapes; a few large ones (the interpreter is slow).
SMALL = [(d, T, dt) for d in (64, 896) for T in (1, 3, 64) for dt in DTYPES]
LARGE = [(2048, 513, torch.bfloat16), (4096, 64, torch.float32), (4096, 1, torch.float16),
         (4096, 3, torch.bfloat16)]


@pytest.mark.parametrize("d, T, dtype", SMALL + LARGE, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_reference_with_bank_index(d, T, dtype):
    bank = make_bank(d)
    h = rand_h(T, d, dtype)
    index = cyclic_index(T, bank.num_steerers)
    closed = check_against_reference(h, bank, index)
    assert bool(closed[index == -1].all())


@pytest.mark.parametrize("d, T, dtype", [(64, 64, torch.float32), (896, 3, torch.bfloat16), (4096, 1, torch.float32)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_matches_reference_without_index(d, T, dtype):
    bank = make_bank(d)
    check_against_reference(rand_h(T, d, dtype), bank, None)


@pytest.mark.parametrize("index_dtype", (torch.int32, torch.int64))
def test_index_none_equals_all_zeros(index_dtype):
    bank = make_bank(96)
    h = rand_h(20, 96, torch.float32)
    separate_thresholds(bank, h, None)
    zeros = torch.zeros(20, dtype=index_dtype, device=DEV)
    assert torch.equal(k.steer_tokens_forward(h, bank, None), k.steer_tokens_forward(h, bank, zeros))


@pytest.mark.parametrize("mode", ("off", "hard", "soft"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gate_modes(mode, dtype):
    d, T = 128, 40
    bank = make_bank(d, [dict(r=4, K=3, H=24, m=2, gate_mode=mode, temperature=0.01)])
    h = rand_h(T, d, dtype, seed=3)
    closed = check_against_reference(h, bank, None, what=mode)
    n_closed = int(closed.sum())
    if mode == "hard":
        assert 0 < n_closed < T, "the hard-gate test should gate some rows off and some on"
    else:
        assert n_closed == 0


@pytest.mark.parametrize("weight_dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_low_precision_weights(weight_dtype, dtype):
    d, T = 320, 24
    bank = make_bank(d, weight_dtype=weight_dtype)
    assert bank.A.dtype == bank.B.dtype == bank.W2.dtype == weight_dtype
    check_against_reference(rand_h(T, d, dtype), bank, cyclic_index(T, bank.num_steerers))


@pytest.mark.parametrize("d, T, split", [(896, 1, 7), (896, 20, 3), (4096, 3, 32), (100, 5, 1000)])
def test_split_d_matches_reference(d, T, split):
    """The split-d path (several programs per row block, last arrival finishes) is exact too."""
    bank = make_bank(d)
    h = rand_h(T, d, torch.bfloat16, seed=5)
    index = cyclic_index(T, bank.num_steerers)
    check_against_reference(h, bank, index, split_d=split, what="split")
    # Deterministic: the partials are summed in a fixed order whatever the arrival order.
    a = k.steer_tokens_forward(h, bank, index, split_d=split)
    assert torch.equal(a, k.steer_tokens_forward(h, bank, index, split_d=split))


@pytest.mark.parametrize("d, T, H, split, block_t", [(80, 37, 40, 1, 16), (80, 37, 40, 2, 16), (200, 5, 300, 1, 16),
                                                     (80, 7, 40, 3, 2), (80, 1, 40, 2, 1)])
def test_gpu_block_configuration(d, T, H, split, block_t):
    """The GPU's block sizes: several row blocks (tl.dot or, below 16 rows, broadcast-reduce),
    several phase-1 H chunks, masked tails."""
    bank = make_bank(d, [dict(r=3, K=5, H=H, m=3, gate_mode="hard"), dict(r=1, K=1, H=7, m=1, gate_mode="soft")])
    h = rand_h(T, d, torch.float16, seed=7)
    check_against_reference(h, bank, cyclic_index(T, 2), split_d=split, config=dict(GPU_CONFIG, BLOCK_T=block_t),
                            what="gpu-config")


def test_wide_mlp_chunks_over_H():
    """H > 256: phase 1 and the epilogue both walk the hidden units in several chunks."""
    d, T = 96, 6
    bank = make_bank(d, [dict(r=2, K=4, H=300, m=5, gate_mode="off")])
    check_against_reference(rand_h(T, d, torch.float32), bank, None, what="H=300")


def test_non_contiguous_hidden_states():
    d, T = 96, 9
    bank = make_bank(d)
    base = rand_h(T, 2 * d, torch.bfloat16)
    strided = base[:, ::2]                                  # stride over d is 2
    transposed = rand_h(d, T, torch.bfloat16, seed=1).t()  # stride over t is 1
    for h in (strided, transposed):
        assert not h.is_contiguous()
        check_against_reference(h, bank, cyclic_index(T, bank.num_steerers), what="non-contiguous")


def test_unsteered_rows_and_zero_strength_are_bit_identical():
    d, T = 64, 10
    bank = make_bank(d)
    h = rand_h(T, d, torch.bfloat16)
    none = torch.full((T,), -1, dtype=torch.int64, device=DEV)
    assert torch.equal(k.steer_tokens_forward(h, bank, none), h)
    assert torch.equal(k.steering_vectors_forward(h, bank, none), torch.zeros(T, d, device=DEV))
    bank.strength.zero_()  # in place, as the bank allows (a captured graph sees it)
    index = cyclic_index(T, bank.num_steerers)
    assert torch.equal(k.steer_tokens_forward(h, bank, index), h)


def test_out_of_range_index_leaves_rows_untouched():
    """Not validated on the hot path (no host sync), but never read out of bounds."""
    d, T = 64, 4
    bank = make_bank(d)
    h = rand_h(T, d, torch.float32)
    index = torch.tensor([3, 7, -5, 0], device=DEV)
    out = k.steer_tokens_forward(h, bank, index)
    assert torch.equal(out[:3], h[:3])


def test_empty_batch():
    bank = make_bank(64)
    h = torch.empty(0, 64, device=DEV)
    assert k.steer_tokens_forward(h, bank, None).shape == (0, 64)
    assert k.steering_vectors_forward(h, bank, torch.empty(0, dtype=torch.int64, device=DEV)).shape == (0, 64)
    assert k.add_vectors_forward(h, torch.zeros(2, 64, device=DEV), torch.empty(0, dtype=torch.int32, device=DEV)).shape == (0, 64)


# ----------------------------------------------------------------------------------------------
# prompt mode pieces
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d, T, S", [(64, 1, 1), (896, 64, 5), (2048, 513, 4)])
def test_add_vectors_matches_reference_bitwise(dtype, d, T, S):
    """One fp32 add and one rounding per element, as in the reference: results agree exactly."""
    h = rand_h(T, d, dtype)
    g = torch.Generator().manual_seed(2)
    vectors = torch.randn(S, d, generator=g).to(DEV)
    vectors[0, : d // 2] = 0.0  # exact zeros keep h's element bit for bit
    slot = (torch.arange(T) % (S + 1) - 1).to(torch.int32).to(DEV)  # −1, 0, 1, …
    out = k.add_vectors_forward(h, vectors, slot)
    assert out.dtype == dtype
    assert torch.equal(out, reference.add_vectors(h, vectors, slot))
    assert torch.equal(out[slot == -1], h[slot == -1])
    rows0 = slot == 0
    assert torch.equal(out[rows0][:, : d // 2], h[rows0][:, : d // 2])


def test_add_vectors_without_slot():
    h = rand_h(7, 96, torch.float16)
    vectors = torch.randn(7, 96).to(DEV)
    assert torch.equal(k.add_vectors_forward(h, vectors, None), reference.add_vectors(h, vectors, None))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_prompt_mode_pipeline(dtype):
    """Prefill: vectors from each sequence's last row; decode: add them by slot (−1 = not steered)."""
    d, B, S = 256, 4, 9
    bank = make_bank(d)
    h = rand_h(B * S, d, dtype, seed=4)
    last = h.view(B, S, d)[:, -1]
    index = torch.tensor([0, 1, -1, 2], device=DEV)
    separate_thresholds(bank, last, index)
    vec = k.steering_vectors_forward(last, bank, index)
    assert_close_verbose(vec, reference.steering_vectors(last, bank, index), *TOLERANCES[torch.float32], "vectors")
    slot = torch.arange(B, device=DEV, dtype=torch.int32).repeat_interleave(S)
    slot[S:2 * S:2] = -1  # some positions of sequence 1 opted out
    out = k.add_vectors_forward(h, vec, slot)
    assert torch.equal(out, reference.add_vectors(h, vec, slot))
    unsteered = (slot == -1) | (slot == 2)
    assert torch.equal(out[unsteered], h[unsteered])


# ----------------------------------------------------------------------------------------------
# the backend module and the dispatcher
# ----------------------------------------------------------------------------------------------


def test_backend_module_contract():
    assert triton_backend.NAME == "triton"
    ok, why = triton_backend.available()
    assert ok and why
    assert triton_backend.supports(DEV)
    other = torch.device("cuda" if DEV.type == "cpu" else "cpu")
    assert not triton_backend.supports(other)
    assert _backends.get_backend("triton", DEV) is triton_backend


@pytest.mark.parametrize("mode", ("token", "prompt"))
def test_dispatcher_uses_triton(mode):
    d = 128
    steerers = [random_steerer(d, seed=1, gate_mode="soft"), random_steerer(d, seed=2, gate_mode="off")]
    bank = SteeringBank.from_steerers(steerers, device=DEV)
    h = rand_h(2 * 5, d, torch.bfloat16).view(2, 5, d)
    index = torch.tensor([1, 0], device=DEV)
    got = fs.steer(h, bank, mode=mode, index=index, backend="triton")
    want = fs.steer(h, bank, mode=mode, index=index, backend="reference")
    assert_close_verbose(got, want, *TOLERANCES[torch.bfloat16], what=f"steer(mode={mode})")


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def _bad_cases():
    d = 32
    bank = make_bank(d)
    h = rand_h(4, d, torch.float32)
    idx = torch.zeros(4, dtype=torch.int64, device=DEV)
    bad_mu = make_bank(d)
    bad_mu.mu = bad_mu.mu.half()
    bad_mode = make_bank(d)
    bad_mode.gate_mode = bad_mode.gate_mode.long()
    strided_a = make_bank(d)
    strided_a.A = strided_a.A.transpose(1, 2).contiguous().transpose(1, 2)
    vec = torch.zeros(4, d, device=DEV)
    tok = k.steer_tokens_forward
    return [
        ("int h", lambda: tok(h.long(), bank, idx), TypeError, "float32/bfloat16/float16"),
        ("3-D h", lambda: tok(h.view(2, 2, d), bank, None), ValueError, r"2-D \[T, d\]"),
        ("hidden size", lambda: tok(rand_h(4, d + 1, torch.float32), bank, None), ValueError, "hidden size 33.*bank has 32"),
        ("index shape", lambda: tok(h, bank, idx[:3]), ValueError, r"index must have shape \[T\] = \(4,\)"),
        ("index dtype", lambda: tok(h, bank, idx.float()), TypeError, "index must be an int32/int64"),
        ("mu dtype", lambda: tok(h, bad_mu, None), TypeError, "bank.mu must be float32"),
        ("gate_mode dtype", lambda: tok(h, bad_mode, None), TypeError, "bank.gate_mode must be int32"),
        ("A layout", lambda: tok(h, strided_a, None), ValueError, "bank.A must be contiguous"),
        ("config", lambda: tok(h, bank, None, config=dict(BLOCK_D=24)), ValueError, "BLOCK_D=24 must be a power of two ≥ 16"),
        ("config T", lambda: tok(h, bank, None, config=dict(BLOCK_T=3)), ValueError, "BLOCK_T=3 must be a power of two ≥ 1"),
        ("config key", lambda: tok(h, bank, None, config=dict(BLOCK_Q=16)), ValueError, "unknown config keys"),
        ("vectors dtype", lambda: k.add_vectors_forward(h, vec.half(), None), TypeError, "vectors must be a float32"),
        ("vectors d", lambda: k.add_vectors_forward(h, vec[:, :-1], None), ValueError, r"vectors must be \[S, d\]"),
        ("slot None", lambda: k.add_vectors_forward(h, vec[:3], None), ValueError, r"S = T = 4"),
        ("slot shape", lambda: k.add_vectors_forward(h, vec, idx[:2]), ValueError, r"slot must have shape"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_clear_error(case):
    name, call, err, msg = _bad_cases()[case]
    with pytest.raises(err, match=msg):
        call()


def test_wrong_device_is_named():
    bank = make_bank(32)
    if DEV.type == "cuda":
        with pytest.raises(RuntimeError, match="CPU tensor"):
            k.steer_tokens_forward(torch.randn(2, 32), bank.to("cpu"), None)
    elif torch.cuda.is_available():  # interpreted kernels refuse CUDA tensors
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            k.steer_tokens_forward(torch.randn(2, 32, device="cuda"), bank, None)
    with pytest.raises(RuntimeError, match="is on meta"):
        k.steer_tokens_forward(torch.empty(2, 32, device="meta"), bank, None)


# ----------------------------------------------------------------------------------------------
# property test
# ----------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(d=st.integers(8, 160), T=st.integers(1, 40), n=st.integers(1, 3), dtype=st.sampled_from(DTYPES),
       wdtype=st.sampled_from(DTYPES), use_index=st.booleans(), split=st.sampled_from([None, 2, 5]),
       data=st.data())
def test_property_random_shapes(d, T, n, dtype, wdtype, use_index, split, data):
    specs = [dict(r=data.draw(st.integers(1, min(5, d))), K=data.draw(st.integers(1, 6)),
                  H=data.draw(st.integers(1, 40)), m=data.draw(st.integers(1, 4)),
                  gate_mode=data.draw(st.sampled_from(["off", "hard", "soft"])), temperature=0.02)
             for _ in range(n)]
    bank = make_bank(d, specs, weight_dtype=wdtype, seed=data.draw(st.integers(0, 100)))
    h = rand_h(T, d, dtype, seed=T)
    index = None
    if use_index:
        index = torch.tensor(data.draw(st.lists(st.integers(-1, n - 1), min_size=T, max_size=T)), device=DEV)
    check_against_reference(h, bank, index, split_d=split, what="property")


# ----------------------------------------------------------------------------------------------
# compile for the GPU without one
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """PTX + cubin for sm_90 with Triton's bundled toolchain: catches what the interpreter lets
    through (tl.dot shape minimums, layout and type errors) on a machine without a GPU."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton install has no NVIDIA backend")
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-m", "finesteer._triton.compile_check", "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, f"compile_check failed:\n{res.stdout}\n{res.stderr[-4000:]}"
    assert res.stdout.count(": ok") == 5, res.stdout
