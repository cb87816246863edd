"""The Triton backend: the fused kernels of :mod:`finesteer._triton.steer` behind the entry points
of :mod:`finesteer.reference` (same signatures, same semantics).

Devices: CUDA tensors when the kernels are compiled (the normal case on a GPU machine); CPU
tensors only when ``TRITON_INTERPRET=1`` was set before the kernels were imported, which runs
them through Triton's (slow) interpreter — how CI tests them without a GPU. Triton fixes the
mode when the kernels are decorated, so the mode of this backend is that of the first import of
:mod:`finesteer._triton.steer` in the process.

Dispatcher ops. Each entry point is one op, ``torch.ops.finesteer_triton.{steering_vectors,
steer_tokens, add_vectors}``, defined here with the schema the C++ ops share
(:mod:`finesteer.fused.op_schema`) and its fake (shape) kernels, so ``torch.compile`` traces
through the backend without a graph break and a compiled model (vLLM's compiled mode, CUDA-graph
capture of a compiled region) sees one opaque node per call. The ops allocate their outputs and
never alias or modify inputs.

No entry point synchronises host and device or depends on tensor values on the host. Index and
slot values follow the contract of :mod:`finesteer.reference`: entries outside their range leave
their row unsteered.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .._constants import GATE_EPS
from .op_schema import SCHEMAS, bank_args, bank_from_args, register_fakes

NAME = "triton"
NAMESPACE = "finesteer_triton"

# The kernels module once loaded; bound in available()/_kernels() so that traced code
# (torch.compile) only reads a plain module global afterwards.
_K = None


def _import_kernels():
    """``finesteer._triton.steer`` (the checkout's ``kernels/steer.py``; see :mod:`finesteer._triton`)."""
    return importlib.import_module("finesteer._triton.steer")


def _kernels():
    global _K
    if _K is None:
        _K = _import_kernels()  # lazy: importing triton costs ~1 s
    return _K


#: The oldest Triton the kernels are tested with (checked: 3.4.0, 3.8.0, 3.9.0). Triton 3.2, which
#: torch 2.6 pins, fails the tests: its interpreter breaks on NumPy 2 and its compile API differs.
MIN_TRITON = (3, 4)


def _release(version: str) -> tuple:
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def available() -> tuple:
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton is not importable ({type(exc).__name__}: {exc}); pip install 'finesteer[triton]'"
    if _release(triton.__version__) < MIN_TRITON:
        return False, (f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest "
                       f"the kernels are tested with (it comes with torch >= 2.8); the other backends serve")
    try:
        k = _kernels()
    except Exception as exc:
        return False, f"triton {triton.__version__} imported but the kernels failed to load ({type(exc).__name__}: {exc})"
    if k.INTERPRETED:
        return True, (f"triton {triton.__version__} under TRITON_INTERPRET=1: runs on CPU tensors through the "
                      f"interpreter (slow; meant for tests), not compiled for CUDA")
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__}, compiled for CUDA ({torch.cuda.device_count()} device(s))"
    return False, (f"triton {triton.__version__} is importable but there is no CUDA device; on CPU it is usable "
                   f"only through its interpreter: set TRITON_INTERPRET=1 before finesteer's Triton kernels "
                   f"are imported")


def supports(device: torch.device) -> bool:
    device = torch.device(device)
    interpreted = _kernels().INTERPRETED
    if device.type == "cuda":
        return not interpreted and torch.cuda.is_available()
    return device.type == "cpu" and interpreted


# ----------------------------------------------------------------------------------------------
# dispatcher ops: the shared schema, kernels for CPU (interpreter) and CUDA, the shared fakes
# ----------------------------------------------------------------------------------------------


def _steering_vectors_impl(h, *bank_and_index_eps):
    *bank, index, eps = bank_and_index_eps
    return _kernels().steering_vectors_forward(h, bank_from_args(*bank), index, eps)


def _steer_tokens_impl(h, *bank_and_index_eps):
    *bank, index, eps = bank_and_index_eps
    return _kernels().steer_tokens_forward(h, bank_from_args(*bank), index, eps)


def _add_vectors_impl(h, vectors, slot):
    return _kernels().add_vectors_forward(h, vectors, slot)


_IMPLS = {"steering_vectors": _steering_vectors_impl, "steer_tokens": _steer_tokens_impl,
          "add_vectors": _add_vectors_impl}

if not hasattr(torch.ops, NAMESPACE) or not hasattr(getattr(torch.ops, NAMESPACE), "steer_tokens"):
    _LIB = torch.library.Library(NAMESPACE, "DEF")  # kept alive: dropping it unregisters the ops
    for _name, _schema in SCHEMAS.items():
        _LIB.define(_name + _schema)
        for _key in ("CPU", "CUDA"):  # the launchers check which of the two the kernels accept
            _LIB.impl(_name, _IMPLS[_name], _key)
    register_fakes(NAMESPACE)


# ----------------------------------------------------------------------------------------------
# backend entry points (the signatures of finesteer.reference)
# ----------------------------------------------------------------------------------------------


def steering_vectors(h: torch.Tensor, bank, index: Optional[torch.Tensor]) -> torch.Tensor:
    """λ·g(h)·s(h) per row → fp32 [T, d]. See :func:`finesteer.reference.steering_vectors`."""
    return torch.ops.finesteer_triton.steering_vectors(h, *bank_args(bank), index, GATE_EPS)


def add_vectors(h: torch.Tensor, vectors: torch.Tensor, slot: Optional[torch.Tensor]) -> torch.Tensor:
    """``h[t] + vectors[slot[t]]``. See :func:`finesteer.reference.add_vectors`."""
    return torch.ops.finesteer_triton.add_vectors(h, vectors, slot)


def steer_tokens(h: torch.Tensor, bank, index: Optional[torch.Tensor]) -> torch.Tensor:
    """Token mode, one fused launch. See :func:`finesteer.reference.steer_tokens`."""
    return torch.ops.finesteer_triton.steer_tokens(h, *bank_args(bank), index, GATE_EPS)
