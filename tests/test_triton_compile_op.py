"""The Triton backend as ``torch.library`` custom ops: op checks and ``torch.compile`` tracing.

:mod:`finesteer.fused.triton` wraps its three entry points as ``torch.ops.finesteer_triton.*``
with fake (shape) implementations, so ``torch.compile`` traces through them without a graph
break (vLLM's compiled mode needs exactly that). Here:

* ``torch.library.opcheck`` (schema, autograd registration, fake-tensor metadata against the
  real kernel's output, AOT dispatch with dynamic shapes) on small inputs; the real kernels run
  through Triton's interpreter on the CPU, which opcheck handles like any CPU kernel;
* ``torch.compile(fullgraph=True)`` of functions calling :func:`finesteer.ops.steer_tokens` /
  ``steering_vectors`` / ``add_vectors`` with ``backend="triton"``: the graph holds the custom
  ops (no break), and the compiled result equals the eager backend and matches the reference.

Like tests/test_triton.py, this module sets ``TRITON_INTERPRET=1`` at collection time when there
is no CUDA (Triton fixes interpreted-vs-compiled when the kernels are decorated, so it must be in
the environment before :mod:`finesteer._triton.steer` is first imported), and skips if the
kernels were already imported compiled on a machine without CUDA. On a GPU machine the same
tests run on CUDA tensors against the compiled kernels.
"""
import os
import sys

import torch

if not torch.cuda.is_available() and "finesteer._triton.steer" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import finesteer as fs  # noqa: E402
from finesteer import _backends, reference  # noqa: E402
from finesteer.bank import SteeringBank  # noqa: E402
from finesteer.fused import triton as triton_backend  # noqa: E402
from tests.utils import TOLERANCES, assert_close_verbose, random_steerer  # noqa: E402

_ok, _why = triton_backend.available()
if not _ok:
    pytest.skip(f"Triton backend unavailable: {_why}", allow_module_level=True)
if not triton_backend.HAS_CUSTOM_OPS:
    pytest.skip(f"torch {torch.__version__} has no torch.library.custom_op (needs torch >= 2.4)",
                allow_module_level=True)

from finesteer._triton import steer as k  # noqa: E402

DEV = torch.device("cpu" if k.INTERPRETED else "cuda")
OPS = torch.ops.finesteer_triton
D = 40


@pytest.fixture(scope="module")
def bank() -> SteeringBank:
    """Two steerers of different odd sizes (hard and soft gate), so padding is exercised."""
    steerers = [random_steerer(D, r=3, K=5, H=11, m=3, seed=1, gate_mode="hard"),
                random_steerer(D, r=2, K=2, H=7, m=1, seed=2, gate_mode="soft", temperature=0.05)]
    return SteeringBank.from_steerers(steerers, device=DEV)


def rand_h(T: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g).to(device=DEV, dtype=dtype)


def index_for(T: int) -> torch.Tensor:
    return (torch.arange(T) % 3 - 1).to(DEV)  # -1, 0, 1, -1, ...


# ----------------------------------------------------------------------------------------------
# op registration and opcheck
# ----------------------------------------------------------------------------------------------


def test_ops_are_registered_with_schemas():
    for name in ("steering_vectors", "steer_tokens", "add_vectors"):
        schema = str(getattr(OPS, name).default._schema)
        assert schema.startswith(f"finesteer_triton::{name}("), schema
        assert "Tensor? " in schema, schema  # the optional index/slot
        assert "(a!)" not in schema, schema  # functional: nothing mutated


@pytest.mark.parametrize("with_index", [True, False])
@pytest.mark.parametrize("op_name", ["steer_tokens", "steering_vectors"])
def test_opcheck_steer_ops(bank, op_name, with_index):
    h = rand_h(5, seed=3)
    args = (h, *triton_backend._bank_args(bank), index_for(5) if with_index else None)
    torch.library.opcheck(getattr(OPS, op_name), args)


@pytest.mark.parametrize("with_slot", [True, False])
def test_opcheck_add_vectors(with_slot):
    h = rand_h(6, dtype=torch.bfloat16, seed=4)
    if with_slot:
        vectors = torch.randn(3, D, device=DEV)
        slot = torch.tensor([0, 2, -1, 1, 0, 2], dtype=torch.int32, device=DEV)
    else:
        vectors, slot = torch.randn(6, D, device=DEV), None
    torch.library.opcheck(OPS.add_vectors, (h, vectors, slot))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_shapes_and_dtypes(bank, dtype):
    """The fake kernels alone (no data): shapes/dtypes of the real outputs, and a clear error for h
    of the wrong hidden size at trace time."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        h = mode.from_tensor(rand_h(7, dtype))
        args = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in triton_backend._bank_args(bank)]
        idx = mode.from_tensor(index_for(7))
        out = OPS.steer_tokens(h, *args, idx)
        assert (tuple(out.shape), out.dtype) == ((7, D), dtype)
        vec = OPS.steering_vectors(h, *args, None)
        assert (tuple(vec.shape), vec.dtype) == ((7, D), torch.float32)
        added = OPS.add_vectors(h, vec[:2], mode.from_tensor(torch.zeros(7, dtype=torch.int32, device=DEV)))
        assert (tuple(added.shape), added.dtype) == ((7, D), dtype)
        bad = mode.from_tensor(torch.zeros(7, D + 1, dtype=dtype, device=DEV))
        with pytest.raises(ValueError, match="hidden size 41, the bank has 40"):
            OPS.steer_tokens(bad, *args, None)


# ----------------------------------------------------------------------------------------------
# torch.compile through finesteer.ops
# ----------------------------------------------------------------------------------------------


class _GraphRecorder:
    """A compile backend that records each graph's call targets and runs it eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward


def _warm_registry() -> None:
    # The registry imports a backend module on its first lookup (importlib: not traceable); any
    # real user resolves the backend before the hot path (FusedSteerer.attach does), so do that.
    _backends.get_backend("triton", DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_steer_tokens_fullgraph(bank, dtype):
    _warm_registry()
    h, idx = rand_h(9, dtype, seed=5), index_for(9)

    def f(x):
        return fs.ops.steer_tokens(x * 1.0, bank, idx, backend="triton")

    rec = _GraphRecorder()
    out = torch.compile(f, backend=rec, fullgraph=True)(h)
    assert len(rec.graphs) == 1, rec.graphs  # one graph: no break
    assert any(t in (OPS.steer_tokens, OPS.steer_tokens.default) for t in rec.graphs[0]), rec.graphs
    assert torch.equal(out, f(h))  # same kernel, same inputs: bit-identical
    atol, rtol = TOLERANCES[dtype]
    assert_close_verbose(out, reference.steer_tokens(h, bank, idx), atol, rtol, "compiled steer_tokens")


def test_compile_prompt_mode_ops_aot_eager(bank):
    """Prompt mode as the HF hook runs it: vectors from the last rows, then the cached add."""
    _warm_registry()
    h = rand_h(8, torch.bfloat16, seed=6)
    idx = torch.tensor([1, -1], device=DEV)
    slot = torch.arange(2, device=DEV, dtype=torch.int32).repeat_interleave(4)

    def f(x):
        vec = fs.ops.steering_vectors(x[3::4], bank, idx, backend="triton")
        return fs.ops.add_vectors(x, vec, slot, backend="triton")

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(h)
    assert torch.equal(out, f(h))
    expected = reference.add_vectors(h, reference.steering_vectors(h[3::4], bank, idx), slot)
    atol, rtol = TOLERANCES[torch.bfloat16]
    assert_close_verbose(out, expected, atol, rtol, "compiled prompt mode")


def test_compile_with_dynamic_batch(bank):
    """One graph with a symbolic row count serves several decode batch sizes (fakes are symbolic)."""
    _warm_registry()

    def f(x):
        return fs.ops.steer_tokens(x, bank, None, backend="triton")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (2, 3, 5):
        h = rand_h(T, seed=T)
        assert_close_verbose(compiled(h), reference.steer_tokens(h, bank, None), *TOLERANCES[torch.float32],
                             what=f"dynamic T={T}")


@pytest.mark.gpu
@pytest.mark.skipif(DEV.type != "cuda", reason="CUDA graphs need a CUDA device (the interpreter runs on the CPU)")
@pytest.mark.parametrize("T", [1, 8])
def test_cuda_graph_capture_and_replay(bank, T):
    """Both decode-path ops (token mode; prompt-mode add) captured in one CUDA graph and replayed on
    new inputs written into the captured buffers give what eager calls give (DESIGN §5)."""
    _warm_registry()
    idx = index_for(T)
    h_static = rand_h(T, torch.bfloat16, seed=7)
    vectors = torch.randn(T, D, device=DEV)

    def step(x):
        return fs.ops.add_vectors(fs.ops.steer_tokens(x, bank, idx, backend="triton"), vectors, None,
                                  backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (lazy inits, autotuning)
        for _ in range(2):
            step(h_static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = step(h_static)
    for seed in (8, 9):
        fresh = rand_h(T, torch.bfloat16, seed=seed)
        h_static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_static, step(fresh)), f"replay differs from eager (seed {seed})"
