"""The Triton backend: the fused kernels of :mod:`finesteer._triton.steer` behind the entry points
of :mod:`finesteer.reference` (same signatures, same semantics).

Devices: CUDA tensors when the kernels are compiled (the normal case on a GPU machine); CPU
tensors only when ``TRITON_INTERPRET=1`` was set before the kernels were imported, which runs
them through Triton's (slow) interpreter — how CI tests them without a GPU. Triton fixes the
mode when the kernels are decorated, so the mode of this backend is that of the first import of
:mod:`finesteer._triton.steer` in the process.

No entry point synchronises host and device or depends on tensor values on the host; index
values are not range-checked here (:func:`finesteer.steer` does that, once): entries outside
``[0, N)`` leave their row unsteered.
"""
from __future__ import annotations

from typing import Optional

import torch

NAME = "triton"


def _kernels():
    from finesteer._triton import steer  # noqa: PLC0415 - lazy: importing triton costs ~1 s

    return steer


def available() -> tuple[bool, str]:
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton is not importable ({type(exc).__name__}: {exc}); pip install 'finesteer[triton]'"
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


def steering_vectors(h: torch.Tensor, bank, index: Optional[torch.Tensor]) -> torch.Tensor:
    """λ·g(h)·s(h) per row → fp32 [T, d] (index −1: zero row). See :func:`finesteer.reference.steering_vectors`."""
    return _kernels().steering_vectors_forward(h, bank, index)


def add_vectors(h: torch.Tensor, vectors: torch.Tensor, slot: Optional[torch.Tensor]) -> torch.Tensor:
    """``h[t] + vectors[slot[t]]`` (slot −1: unchanged). See :func:`finesteer.reference.add_vectors`."""
    return _kernels().add_vectors_forward(h, vectors, slot)


def steer_tokens(h: torch.Tensor, bank, index: Optional[torch.Tensor]) -> torch.Tensor:
    """Token mode, one fused launch. See :func:`finesteer.reference.steer_tokens`."""
    return _kernels().steer_tokens_forward(h, bank, index)
