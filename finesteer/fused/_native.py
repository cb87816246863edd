"""What the ``cpu`` and ``cuda`` backends share: both call the same dispatcher ops
(``torch.ops.finesteer_ext.*``, schemas in ``csrc/ops.cpp``) and differ only in which compiled
library registers the kernels for their device (:mod:`finesteer._ext` loads them)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .._constants import GATE_EPS
from ..bank import SteeringBank


def bank_args(bank: SteeringBank) -> tuple:
    """The bank's tensors in the order of the ops' schemas."""
    return (bank.A, bank.B, bank.W2, bank.mu, bank.c, bank.b1, bank.b2, bank.gate_mode, bank.threshold,
            bank.temperature, bank.strength)


class NativeBackend:
    """Entry points of a backend whose kernels come from a compiled library.

    ``load`` returns ``(ok, reason)`` and is cached by :mod:`finesteer._ext`, so calling it on
    every first use is cheap; the ops namespace is bound once it succeeds, so traced code
    (torch.compile) only sees an attribute read afterwards.
    """

    def __init__(self, name: str, load: Callable[[], tuple]):
        self.name, self._load, self._ops = name, load, None

    def available(self) -> tuple[bool, str]:
        ok, reason = self._load()
        if ok:
            self._ops = torch.ops.finesteer_ext
        return ok, reason

    def ops(self):
        if self._ops is None:
            ok, reason = self.available()
            if not ok:
                raise RuntimeError(f"finesteer {self.name} backend is unavailable: {reason}")
        return self._ops

    def steering_vectors(self, h: torch.Tensor, bank: SteeringBank, index: Optional[torch.Tensor]) -> torch.Tensor:
        """λ·g(h)·s(h) per row: ``h`` [T, d], ``index`` [T] (−1 = none) or None → fp32 [T, d]."""
        return self.ops().steering_vectors(h, *bank_args(bank), index, GATE_EPS)

    def add_vectors(self, h: torch.Tensor, vectors: torch.Tensor, slot: Optional[torch.Tensor]) -> torch.Tensor:
        """``out[t] = h[t] + vectors[slot[t]]`` (−1: unchanged); ``slot=None``: row t takes vector t."""
        return self.ops().add_vectors(h, vectors, slot)

    def steer_tokens(self, h: torch.Tensor, bank: SteeringBank, index: Optional[torch.Tensor]) -> torch.Tensor:
        """Token mode, fused: every row of ``h`` [T, d] gets its own gate and vector added."""
        return self.ops().steer_tokens(h, *bank_args(bank), index, GATE_EPS)
