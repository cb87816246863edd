"""The conformance suite: one operator contract, checked on every backend.

Every test here runs once per backend of :func:`finesteer.backends` (``cpu``, ``triton``,
``cuda``; ``reference`` too where the test is about the contract rather than agreement with the
reference) and skips with the backend's own reason where it is unavailable. The contract is
:mod:`finesteer.reference`: its docstring states it, including the index/slot rule (values
outside their range act as −1 on every backend, and only the validating ``finesteer.steer``
raises). Helpers come from ``tests/utils.py``: one bank factory, one index generator, one
near-threshold strategy (``separate_thresholds``), one tolerance table.

Devices: ``cpu`` on CPU tensors, ``cuda`` on CUDA tensors, ``triton`` on CUDA tensors when
compiled and on CPU tensors under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` on a
machine without CUDA). The interpreter is slow, so shapes are small by default; the large ones
are marked ``slow`` for the Triton backend.

What is truly backend-specific lives in small files: ``test_cpu.py`` (ISA choice, threads, the
build and the fallback without it), ``test_triton.py`` (split-d, block configurations,
compiling for sm_90, dynamic-shape compile) and ``test_cuda.py`` (more rows than a grid
dimension).
"""
from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

import finesteer as fs
from finesteer import _backends, reference
from finesteer._constants import FLOAT_DTYPES, GATE_EPS, GATE_HARD, GATE_OFF, GATE_SOFT
from finesteer.fused.op_schema import SCHEMAS, bank_args

from .utils import (TOLERANCES, assert_close_verbose, bank_index, check_against_reference, make_bank, random_h,
                    random_steerer, separate_thresholds)

FUSED = ("cpu", "triton", "cuda")
ALL = ("reference",) + FUSED
ROOT = Path(__file__).resolve().parent.parent


class Backend(types.SimpleNamespace):
    """A backend under test: ``name``, ``impl`` (its entry points) and the ``device`` it runs on."""

    def __repr__(self):
        return self.name


def _resolve(name: str) -> Backend:
    listing = fs.backends()[name]
    if not listing.startswith("available"):
        pytest.skip(f"{name} backend {listing}")
    impl = _backends._load(name)[0]
    # The device it runs on: CUDA where it can (triton compiled, cuda), else the CPU (cpu, triton
    # under its interpreter, the reference without a GPU).
    device = next(torch.device(t) for t in ("cuda", "cpu")
                  if (t == "cpu" or torch.cuda.is_available()) and impl.supports(torch.device(t)))
    return Backend(name=name, impl=impl, device=device)


_resolved: dict = {}


@pytest.fixture
def backend(request) -> Backend:
    """Indirectly parametrised with a backend name; skips with the backend's reason."""
    if request.param not in _resolved:
        try:
            _resolved[request.param] = _resolve(request.param)
        except pytest.skip.Exception as exc:
            _resolved[request.param] = exc
    found = _resolved[request.param]
    if isinstance(found, BaseException):
        pytest.skip(str(found))
    return found


def over(names=FUSED, cases=((),), slow_cases=(), argnames=""):
    """``parametrize`` over ``names`` × ``cases``; ``slow_cases`` are marked ``slow`` for the
    Triton backend (its interpreter is ~1000× slower than the kernels it stands in for)."""
    params = []
    for name in names:
        for case in cases:
            params.append(pytest.param(name, *case, id="-".join([name, *map(_id, case)])))
        for case in slow_cases:
            marks = (pytest.mark.slow,) if name == "triton" else ()
            params.append(pytest.param(name, *case, marks=marks, id="-".join([name, *map(_id, case)])))
    return pytest.mark.parametrize("backend" + (", " + argnames if argnames else ""), params, indirect=["backend"])


def _id(v) -> str:
    return str(v).replace("torch.", "").replace(" ", "")


# ----------------------------------------------------------------------------------------------
# agreement with the reference
# ----------------------------------------------------------------------------------------------

SHAPES = [(64, T, dt) for T in (1, 3, 37) for dt in FLOAT_DTYPES] + [(200, 5, torch.float32), (200, 37, torch.bfloat16)]
LARGE_SHAPES = [(896, 64, torch.float32), (2048, 129, torch.bfloat16), (4096, 1, torch.float16),
                (4096, 3, torch.bfloat16), (4096, 64, torch.float32)]


@over(cases=SHAPES, slow_cases=LARGE_SHAPES, argnames="d, T, dtype")
def test_token_mode_matches_reference(backend, d, T, dtype):
    bank = make_bank(d, seed=d + T, device=backend.device)
    h = random_h(T, d, dtype, seed=T, device=backend.device)
    index = bank_index(T, bank.num_steerers, seed=T, device=backend.device)
    closed = check_against_reference(backend.impl, h, bank, index, backend.name)
    assert bool(closed[index == -1].all())


ODD_SIZES = [(1, (1, 1, 1, 1)), (7, (7, 5, 33, 3)), (7, (3, 11, 129, 13)), (67, (1, 1, 1, 1)), (67, (7, 5, 33, 3))]
LARGE_ODD_SIZES = [(1029, (16, 8, 256, 10)), (67, (3, 40, 600, 37))]  # J > 512, K > 32


@over(cases=ODD_SIZES, slow_cases=LARGE_ODD_SIZES, argnames="d, sizes")
def test_odd_sizes(backend, d, sizes):
    r, K, H, m = sizes
    specs = [dict(r=r, K=K, H=H, m=m, gate_mode=mode) for mode in ("hard", "soft", "off")]
    bank = make_bank(d, specs, seed=d, device=backend.device)
    h = random_h(37, d, seed=d, device=backend.device)
    check_against_reference(backend.impl, h, bank, bank_index(37, 3, seed=d, device=backend.device), backend.name)


@over(cases=[(mode, dt) for mode in ("off", "hard", "soft") for dt in FLOAT_DTYPES], argnames="mode, dtype")
def test_gate_modes_with_index_none(backend, mode, dtype):
    """``index=None``: every row uses steerer 0. A hard gate opens for some rows, not others."""
    d, T = 128, 40
    bank = make_bank(d, [dict(r=4, K=3, H=24, m=2, gate_mode=mode, temperature=0.01)], device=backend.device)
    h = random_h(T, d, dtype, seed=3, device=backend.device, scale=2.0)
    closed = check_against_reference(backend.impl, h, bank, None, f"{backend.name} {mode}")
    if mode == "hard":
        assert 0 < int(closed.sum()) < T, "the hard-gate test should gate some rows off and some on"
    else:
        assert int(closed.sum()) == 0


@over(cases=[(w, dt) for w in (torch.bfloat16, torch.float16) for dt in FLOAT_DTYPES], argnames="wdtype, dtype")
def test_half_precision_weights(backend, wdtype, dtype):
    d = 320
    bank = make_bank(d, weight_dtype=wdtype, seed=11, device=backend.device)
    assert bank.A.dtype == bank.B.dtype == bank.W2.dtype == wdtype
    for T in (1, 9):
        h = random_h(T, d, dtype, seed=T, device=backend.device)
        check_against_reference(backend.impl, h, bank, bank_index(T, 3, seed=T, device=backend.device),
                                f"{backend.name} weights {wdtype}")


@over()
def test_many_steerers(backend):
    bank = make_bank(96, [dict(gate_mode=("soft", "off", "hard")[i % 3], K=1 + i % 4, H=5 + i) for i in range(8)],
                     seed=30, device=backend.device)
    h = random_h(70, 96, seed=4, device=backend.device)
    check_against_reference(backend.impl, h, bank, bank_index(70, 8, seed=4, device=backend.device), "bank of 8")


@over()
def test_non_contiguous_input(backend):
    d, T = 96, 9
    dev = backend.device
    bank = make_bank(d, device=dev)
    idx = bank_index(T, 3, seed=9, device=dev)
    strided = random_h(T, 2 * d, torch.bfloat16, device=dev)[:, ::2]       # stride over d is 2
    transposed = random_h(d, T, torch.bfloat16, seed=1, device=dev).t()     # stride over t is 1
    row_stride = random_h(T, 2 * d, torch.float16, seed=2, device=dev)[:, :d]  # rows 2d apart
    for h in (strided, transposed, row_stride):
        assert not h.is_contiguous()
        check_against_reference(backend.impl, h, bank, idx, f"{backend.name} non-contiguous h")
    idx_nc = torch.stack([idx, idx], 1)[:, 0]
    assert not idx_nc.is_contiguous()
    check_against_reference(backend.impl, strided, bank, idx_nc, f"{backend.name} strided index")


@over()
def test_index_dtypes_agree(backend):
    """int32 and int64 indices give the same result; ``index=None`` equals an all-zero index."""
    dev = backend.device
    bank = make_bank(96, device=dev)
    h = random_h(20, 96, device=dev)
    idx = bank_index(20, 3, seed=1, device=dev)
    separate_thresholds(bank, h, idx)
    run = backend.impl.steer_tokens
    assert torch.equal(run(h, bank, idx), run(h, bank, idx.int()))
    zeros = torch.zeros(20, dtype=torch.int32, device=dev)
    separate_thresholds(bank, h, None)
    assert torch.equal(run(h, bank, None), run(h, bank, zeros))
    assert torch.equal(run(h, bank, None), run(h, bank, zeros.long()))


@over(names=ALL)
def test_empty_batch(backend):
    dev = backend.device
    bank = make_bank(64, device=dev)
    h = torch.empty(0, 64, device=dev)
    assert backend.impl.steer_tokens(h, bank, None).shape == (0, 64)
    assert backend.impl.steering_vectors(h, bank, torch.empty(0, dtype=torch.int64, device=dev)).shape == (0, 64)
    empty_slot = torch.empty(0, dtype=torch.int32, device=dev)
    assert backend.impl.add_vectors(h, torch.zeros(2, 64, device=dev), empty_slot).shape == (0, 64)


# ----------------------------------------------------------------------------------------------
# exactness: unsteered rows, the index/slot contract, add_vectors
# ----------------------------------------------------------------------------------------------


@over(names=ALL, cases=[(dt,) for dt in FLOAT_DTYPES], argnames="dtype")
def test_unsteered_rows_are_bit_identical(backend, dtype):
    """Index −1, a gate closed by a wide margin and λ = 0 return ``h`` bit for bit (vectors 0)."""
    d, T, dev = 160, 45, backend.device
    bank = fs.SteeringBank.from_steerers([random_steerer(d, seed=1, gate_mode="off"),
                                          random_steerer(d, seed=2, gate_mode="hard", threshold=2.0),  # scores ≤ 1
                                          random_steerer(d, seed=3, gate_mode="off", strength=0.0)], device=dev)
    h = random_h(T, d, dtype, device=dev)
    idx = (torch.arange(T, device=dev) % 4) - 1  # −1, 0, 1, 2, −1, ...
    out = backend.impl.steer_tokens(h, bank, idx)
    vec = backend.impl.steering_vectors(h, bank, idx)
    untouched = idx != 0
    assert torch.equal(out[untouched], h[untouched])
    assert torch.equal(vec[untouched], torch.zeros_like(vec[untouched]))
    assert not torch.equal(out[~untouched], h[~untouched])
    assert torch.equal(backend.impl.steer_tokens(h, bank, torch.full((T,), -1, device=dev)), h)
    bank.strength.zero_()  # in place, as the bank allows (a captured graph sees it)
    assert torch.equal(backend.impl.steer_tokens(h, bank, idx.clamp(min=0)), h)


@over(names=ALL)
def test_zero_vector_components_select_h(backend):
    """Where only some components of a row's vector are exactly zero, exactly those keep h's bits."""
    d, dev = 64, backend.device
    bank = fs.SteeringBank.from_steerers([random_steerer(d, K=2, m=1, seed=4, gate_mode="off")], device=dev)
    bank.B[0, :, ::3] = 0.0  # every third output component is exactly 0
    h = random_h(9, d, torch.bfloat16, device=dev)
    out = backend.impl.steer_tokens(h, bank, None)
    assert torch.equal(out[:, ::3], h[:, ::3])
    assert_close_verbose(out, reference.steer_tokens(h, bank, None), *TOLERANCES[torch.bfloat16], "partial zeros")


@over(names=ALL, cases=[(torch.int64,), (torch.int32,)], argnames="index_dtype")
def test_out_of_range_index_acts_as_minus_one(backend, index_dtype):
    """The contract of finesteer.reference: any index outside [0, N) leaves its row unchanged
    (vector 0), on every backend, with no error and no out-of-bounds read."""
    d, dev = 64, backend.device
    bank = make_bank(d, device=dev)  # N = 3
    info = torch.iinfo(index_dtype)
    values = [3, 4, 1000, -2, -1000, info.max, info.min, 0, 1, 2]
    if index_dtype == torch.int64:
        values[2] = 2 ** 32 + 1  # would wrap onto steerer 1 if narrowed to int32
    idx = torch.tensor(values, dtype=index_dtype, device=dev)
    h = random_h(len(values), d, device=dev)
    as_minus_one = torch.where((idx >= 0) & (idx < 3), idx, torch.full_like(idx, -1))
    separate_thresholds(bank, h, as_minus_one)
    out = backend.impl.steer_tokens(h, bank, idx)
    vec = backend.impl.steering_vectors(h, bank, idx)
    assert torch.equal(out[:7], h[:7])
    assert torch.equal(vec[:7], torch.zeros_like(vec[:7]))
    assert torch.equal(out, backend.impl.steer_tokens(h, bank, as_minus_one))
    assert torch.equal(vec, backend.impl.steering_vectors(h, bank, as_minus_one))


@over(names=ALL, cases=[(dt,) for dt in FLOAT_DTYPES], argnames="dtype")
def test_add_vectors_is_exact(backend, dtype):
    """One fp32 add and one rounding per element, as in the reference: results agree bit for bit.
    Slots outside [0, S) leave their row unchanged."""
    T, S, d, dev = 23, 4, 300, backend.device
    h = random_h(T, d, dtype, device=dev)
    v = torch.randn(S, d, generator=torch.Generator().manual_seed(2)).to(dev)
    v[1, :50] = 0.0  # exact zeros keep h's element bit for bit
    v[2] = 0.0
    slot = (torch.arange(T) % (S + 4) - 2).to(dev)  # −2, −1, 0, …, S − 1, S, S + 1, −2, …
    strided_slot = torch.stack([slot, slot], 1)[:, 0]
    for sl in (slot, slot.int(), strided_slot):
        out = backend.impl.add_vectors(h, v, sl)
        assert out.dtype == dtype and out.shape == h.shape
        assert torch.equal(out, reference.add_vectors(h, v, sl))
    outside = (slot < 0) | (slot >= S)
    assert bool(outside.any()) and torch.equal(out[outside], h[outside])
    assert torch.equal(out[slot == 2], h[slot == 2])
    assert torch.equal(out[slot == 1][:, :50], h[slot == 1][:, :50])
    v_rows = torch.randn(T, d).to(dev)
    assert torch.equal(backend.impl.add_vectors(h, v_rows, None), reference.add_vectors(h, v_rows, None))
    strided = h.t().contiguous().t()
    assert torch.equal(backend.impl.add_vectors(strided, v_rows, None), reference.add_vectors(h, v_rows, None))


# ----------------------------------------------------------------------------------------------
# through the public API
# ----------------------------------------------------------------------------------------------


@over(cases=[(dt,) for dt in (torch.float32, torch.bfloat16)], argnames="dtype")
def test_public_steer_token_and_prompt_modes(backend, dtype):
    d, dev = 160, backend.device
    steerers = [random_steerer(d, seed=20, gate_mode="soft"), random_steerer(d, seed=21, gate_mode="off")]
    bank = fs.SteeringBank.from_steerers(steerers, device=dev)
    atol, rtol = TOLERANCES[dtype]
    h = random_h(3 * 7, d, dtype, device=dev).view(3, 7, d)
    index = torch.tensor([1, -1, 0], device=dev)
    last = torch.tensor([6, 2, 4], device=dev)
    for mode, kw in (("token", {}), ("prompt", dict(last_index=last))):
        got = fs.steer(h, bank, mode=mode, index=index, backend=backend.name, **kw)
        exp = fs.steer(h, bank, mode=mode, index=index, backend="reference", **kw)
        assert_close_verbose(got, exp, atol, rtol, f"{mode} mode via steer()")
        assert torch.equal(got[1], h[1])  # index −1: the whole sequence untouched
    got = fs.steer(h[0], steerers[1], mode="prompt", backend=backend.name)  # one Steerer, 2-D input
    exp = fs.steer(h[0], steerers[1], mode="prompt", backend="reference")
    assert_close_verbose(got, exp, atol, rtol, "prompt mode, one steerer")


@over(names=ALL)
def test_public_steer_validates_the_index_before_dispatch(backend):
    """``check_index_range=True`` (the default) raises before any backend runs; with ``False`` the
    same values act as −1, as the backends' contract says."""
    d, dev = 32, backend.device
    bank = make_bank(d, device=dev)
    h = random_h(4, d, device=dev)
    bad = torch.tensor([0, 3, -1, -2], device=dev)
    with pytest.raises(IndexError, match=r"index values must be in \[-1, 2\]"):
        fs.steer(h, bank, index=bad, backend=backend.name)
    separate_thresholds(bank, h, torch.tensor([0, -1, -1, -1]))
    out = fs.steer(h, bank, index=bad, backend=backend.name, check_index_range=False)
    assert torch.equal(out[1:], h[1:])


# ----------------------------------------------------------------------------------------------
# the dispatcher ops: one schema, fakes, torch.compile, CUDA graphs
# ----------------------------------------------------------------------------------------------


def _namespace(backend: Backend):
    return getattr(torch.ops, "finesteer_triton" if backend.name == "triton" else "finesteer_ext")


def test_one_schema_for_the_cpp_and_triton_ops():
    """csrc/ops.cpp defines finesteer_ext with exactly op_schema.SCHEMAS; the Triton ops are
    defined from SCHEMAS; where both libraries are loaded, the dispatcher agrees."""
    cpp = (ROOT / "csrc" / "ops.cpp").read_text()
    defs = {}
    for literals in re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\);", cpp):
        text = "".join(re.findall(r"\"([^\"]*)\"", literals))
        name, _, schema = text.partition("(")
        defs[name] = "(" + schema
    assert defs == SCHEMAS
    loaded = {ns: getattr(torch.ops, ns) for ns in ("finesteer_ext", "finesteer_triton")
              if fs.backends()["cpu" if ns == "finesteer_ext" else "triton"].startswith("available")}
    for ns, ops in loaded.items():
        for name, schema in SCHEMAS.items():
            assert str(getattr(ops, name).default._schema) == f"{ns}::{name}{schema}"


def test_gate_mode_codes_agree_with_the_native_header():
    header = (ROOT / "csrc" / "operator_contract.h").read_text()
    codes = dict(re.findall(r"(kGate\w+) = (\d+)", header))
    assert codes == {"kGateOff": str(GATE_OFF), "kGateHard": str(GATE_HARD), "kGateSoft": str(GATE_SOFT)}


@over()
def test_opcheck_schema_and_fakes(backend):
    dev = backend.device
    bank = make_bank(24, [dict(r=3, K=5, H=11, m=3, gate_mode="hard"), dict(r=2, K=2, H=7, m=1, gate_mode="soft")],
                     device=dev)
    h = random_h(6, 24, torch.bfloat16, device=dev)
    ops = _namespace(backend)
    # Tracing (fakes under torch.compile, symbolic batch sizes) is test_traces_under_torch_compile.
    utils = ("test_schema", "test_faketensor")
    for index in (torch.tensor([0, -1, 1, 0, -1, 1], device=dev), None):
        args = (h, *bank_args(bank), index, GATE_EPS)
        torch.library.opcheck(ops.steer_tokens.default, args, test_utils=utils)
        torch.library.opcheck(ops.steering_vectors.default, args, test_utils=utils)
    for vectors, slot in ((torch.randn(3, 24, device=dev), torch.tensor([0, 2, -1, 1, 0, 9], device=dev)),
                          (torch.randn(6, 24, device=dev), None)):
        torch.library.opcheck(ops.add_vectors.default, (h, vectors, slot), test_utils=utils)


@over()
def test_fakes_give_shapes_and_name_a_wrong_hidden_size(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    dev = backend.device
    bank = make_bank(40, device=dev)
    ops = _namespace(backend)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        args = [mode.from_tensor(t) for t in bank_args(bank)]
        h = mode.from_tensor(random_h(7, 40, torch.bfloat16, device=dev))
        out = ops.steer_tokens(h, *args, None, GATE_EPS)
        assert (tuple(out.shape), out.dtype) == ((7, 40), torch.bfloat16)
        vec = ops.steering_vectors(h, *args, None, GATE_EPS)
        assert (tuple(vec.shape), vec.dtype) == ((7, 40), torch.float32)
        added = ops.add_vectors(h, vec[:2], mode.from_tensor(torch.zeros(7, dtype=torch.int32, device=dev)))
        assert (tuple(added.shape), added.dtype) == ((7, 40), torch.bfloat16)
        bad = mode.from_tensor(torch.zeros(7, 41, device=dev))
        with pytest.raises(ValueError, match="hidden size 41, the bank has 40"):
            ops.steer_tokens(bad, *args, None, GATE_EPS)


@over()
def test_traces_under_torch_compile(backend):
    """One graph (no break) through all three ops; and one graph with a symbolic row count that
    serves several decode batch sizes (the fakes are symbolic)."""
    dev = backend.device
    bank = make_bank(48, device=dev)
    h = random_h(5, 48, device=dev)
    idx = torch.tensor([0, -1, 1, 2, 0], device=dev)
    _backends.get_backend(backend.name, dev)  # resolve first, as every caller does: importlib is not traceable

    def f(x):
        vec = fs.ops.steering_vectors(x[::2], bank, idx[::2], backend=backend.name)
        steered = fs.ops.steer_tokens(x * 1.0, bank, idx, backend=backend.name)
        return fs.ops.add_vectors(steered, vec, torch.tensor([0, 1, -1, 2, 0], device=dev), backend=backend.name)

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(h), f(h))

    def g(x):
        return fs.ops.steer_tokens(x, bank, None, backend=backend.name)

    dynamic = torch.compile(g, backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (2, 3):
        x = random_h(T, 48, seed=T, device=dev)
        assert torch.equal(dynamic(x), g(x)), f"dynamic T={T}"


@pytest.mark.gpu
@over(cases=[(1,), (8,)], argnames="T")
def test_cuda_graph_capture_and_replay(backend, T):
    """Both decode-path ops captured in one CUDA graph and replayed on new inputs written into the
    captured buffers give what eager calls give; λ changed in place is picked up (DESIGN §5)."""
    if backend.device.type != "cuda":
        pytest.skip(f"{backend.name} runs on {backend.device} here; CUDA graphs need a CUDA device")
    dev, d = backend.device, 256
    bank = make_bank(d, device=dev)
    idx = bank_index(T, 3, device=dev)
    h_static = random_h(T, d, torch.bfloat16, device=dev)
    vectors = torch.randn(T, d, device=dev)

    def step(x):
        return backend.impl.add_vectors(backend.impl.steer_tokens(x, bank, idx), vectors, None)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (lazy inits, builds)
        for _ in range(2):
            step(h_static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = step(h_static)
    for seed in (8, 9):
        fresh = random_h(T, d, torch.bfloat16, seed=seed, device=dev)
        h_static.copy_(fresh)
        bank.strength.mul_(0.5)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_static, step(fresh)), f"replay differs from eager (seed {seed})"


# ----------------------------------------------------------------------------------------------
# bad input: the same exception type and a message naming the problem, on every fused backend
# ----------------------------------------------------------------------------------------------


def _bad_cases(dev):
    d = 32
    bank = make_bank(d, device=dev)
    h = random_h(4, d, device=dev)
    idx = torch.zeros(4, dtype=torch.int64, device=dev)
    vec = torch.zeros(4, d, device=dev)

    def with_(**changes):
        return fs.SteeringBank(**{**bank.tensors(), **changes}, r=bank.r, K=bank.K, H=bank.H, m=bank.m)

    return {
        "int h": (lambda b: b.steer_tokens(h.long(), bank, idx), TypeError, "h must be float32/bfloat16/float16"),
        "3-D h": (lambda b: b.steer_tokens(h.view(2, 2, d), bank, None), ValueError, r"2-D \[T, d\]"),
        "hidden size": (lambda b: b.steer_tokens(random_h(4, d + 1, device=dev), bank, None), ValueError,
                        "hidden size"),
        "index shape": (lambda b: b.steer_tokens(h, bank, idx[:3]), ValueError, r"index must have shape \[T\]"),
        "index dtype": (lambda b: b.steer_tokens(h, bank, idx.float()), TypeError, "index must be (an )?int32"),
        "mu dtype": (lambda b: b.steer_tokens(h, with_(mu=bank.mu.double()), None), TypeError, "must be float32"),
        "B dtype": (lambda b: b.steer_tokens(h, with_(B=bank.B.half()), None), TypeError, "share one weight dtype"),
        "gate_mode dtype": (lambda b: b.steer_tokens(h, with_(gate_mode=bank.gate_mode.long()), None), TypeError,
                            "gate_mode must be (int32|Int)"),
        "A layout": (lambda b: b.steer_tokens(h, with_(A=bank.A.transpose(1, 2).contiguous().transpose(1, 2)), None),
                     ValueError, "A must be contiguous"),
        "vectors dtype": (lambda b: b.add_vectors(h, vec.half(), None), TypeError, "vectors must be (a )?float32"),
        "vectors d": (lambda b: b.add_vectors(h, vec[:, :-1], None), ValueError, r"vectors must be \[S, "),
        "slot None": (lambda b: b.add_vectors(h, vec[:3], None), ValueError, "one row per row of h"),
        "slot shape": (lambda b: b.add_vectors(h, vec, idx[:2]), ValueError, "slot must have shape"),
        "slot dtype": (lambda b: b.add_vectors(h, vec, idx.float()), TypeError, "slot must be (an )?int32"),
    }


BAD_CASES = ("int h", "3-D h", "hidden size", "index shape", "index dtype", "mu dtype", "B dtype", "gate_mode dtype",
             "A layout", "vectors dtype", "vectors d", "slot None", "slot shape", "slot dtype")


@over(cases=[(c,) for c in BAD_CASES], argnames="case")
def test_bad_input_raises_a_clear_error(backend, case):
    cases = _bad_cases(backend.device)
    assert tuple(cases) == BAD_CASES
    call, err, msg = cases[case]
    with pytest.raises(err, match=msg):
        call(backend.impl)


# ----------------------------------------------------------------------------------------------
# property test
# ----------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@over()
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(d=st.integers(1, 160), T=st.integers(1, 40), n=st.integers(1, 3), dtype=st.sampled_from(FLOAT_DTYPES),
       wdtype=st.sampled_from(FLOAT_DTYPES), use_index=st.booleans(), data=st.data())
def test_property_random_shapes(backend, d, T, n, dtype, wdtype, use_index, data):
    specs = [dict(r=data.draw(st.integers(1, 6)), K=data.draw(st.integers(1, 6)), H=data.draw(st.integers(1, 40)),
                  m=data.draw(st.integers(1, 4)), gate_mode=data.draw(st.sampled_from(["off", "hard", "soft"])),
                  temperature=0.02) for _ in range(n)]
    bank = make_bank(d, specs, weight_dtype=wdtype, seed=data.draw(st.integers(0, 100)), device=backend.device)
    h = random_h(T, d, dtype, seed=T, device=backend.device, scale=3.0)
    index = None
    if use_index:
        index = torch.tensor(data.draw(st.lists(st.integers(-1, n - 1), min_size=T, max_size=T)),
                             device=backend.device)
    check_against_reference(backend.impl, h, bank, index, f"{backend.name} property")
