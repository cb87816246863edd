"""``cuda`` backend: the fused CUDA operator in ``csrc/cuda/`` (DESIGN §4).

Same entry points and semantics as :mod:`finesteer.reference`; each call is one dispatcher op
(``torch.ops.finesteer_ext.*``) that launches two kernels (``steer_tokens``/``steering_vectors``)
or one (``add_vectors``) on the current CUDA stream: no host sync, no data-dependent shapes,
so it can be captured in a CUDA graph. The extension is built or loaded on first use by
:mod:`finesteer._ext`; when that is impossible (CPU-only torch, no nvcc, no GPU,
``FINESTEER_DISABLE_EXT=1``) ``available()`` says why and the dispatcher falls back to the next
backend.

Bank indices and slots outside their range are treated as −1 on the device (a check would need a
host sync); :func:`finesteer.steer` validates them before calling in.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from .._constants import GATE_EPS
from ..bank import SteeringBank

_OPS = None

NAME = "cuda"


def available() -> tuple[bool, str]:
    global _OPS
    ok, reason = _ext.load_cuda()
    if ok:
        # Bound here so that traced code (torch.compile) only ever sees a plain global afterwards.
        _OPS = torch.ops.finesteer_ext
    return ok, reason


def supports(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def _ops():
    """``torch.ops.finesteer_ext`` once the CUDA kernels are loaded (raises with the reason if not)."""
    global _OPS
    if _OPS is None:
        ok, reason = _ext.load_cuda()
        if not ok:
            raise RuntimeError(f"finesteer cuda backend is unavailable: {reason}")
        _OPS = torch.ops.finesteer_ext
    return _OPS


def _bank_args(bank: SteeringBank) -> tuple:
    return (bank.A, bank.B, bank.W2, bank.mu, bank.c, bank.b1, bank.b2, bank.gate_mode, bank.threshold,
            bank.temperature, bank.strength)


def steering_vectors(h: torch.Tensor, bank: SteeringBank, index: Optional[torch.Tensor]) -> torch.Tensor:
    """λ·g(h)·s(h) per row: ``h`` [T, d], ``index`` [T] (−1 = none) or None → fp32 [T, d]."""
    return _ops().steering_vectors(h, *_bank_args(bank), index, GATE_EPS)


def add_vectors(h: torch.Tensor, vectors: torch.Tensor, slot: Optional[torch.Tensor]) -> torch.Tensor:
    """``out[t] = h[t] + vectors[slot[t]]`` (−1: unchanged); ``slot=None`` means row t takes vector t."""
    return _ops().add_vectors(h, vectors, slot)


def steer_tokens(h: torch.Tensor, bank: SteeringBank, index: Optional[torch.Tensor]) -> torch.Tensor:
    """Token mode, fused: every row of ``h`` [T, d] gets its own gate and vector added."""
    return _ops().steer_tokens(h, *_bank_args(bank), index, GATE_EPS)
