"""The ``cpu`` and ``cuda`` backends: the fused C++ operator in ``csrc/`` (DESIGN §4).

Both backends call the same dispatcher ops, ``torch.ops.finesteer_ext.{steering_vectors,
steer_tokens, add_vectors}`` (schema: :mod:`finesteer.fused.op_schema`, defined in
``csrc/ops.cpp``), and differ only in which compiled library registers the kernels for their
device:

* ``cpu`` (:data:`CPU`): ``csrc/cpu/steer_cpu.cpp``, multithreaded with ATen's intra-op pool;
* ``cuda`` (:data:`CUDA`): ``csrc/cuda/``, two launches on the current stream (one for
  ``add_vectors``), no host sync and no data-dependent shapes, so it can be captured in a CUDA
  graph.

Semantics, including the index/slot contract (out-of-range values act as −1), are those of
:mod:`finesteer.reference`. :mod:`finesteer._ext` builds or loads the libraries on first use;
when that is impossible (no compiler, CPU-only torch, no GPU, ``FINESTEER_DISABLE_EXT=1``)
``available()`` says why and the dispatcher falls back. The fake kernels of the ops are
registered here once a library has loaded.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _ext
from .._constants import GATE_EPS
from ..bank import SteeringBank
from .op_schema import bank_args, register_fakes

NAMESPACE = "finesteer_ext"


class NativeBackend:
    """One backend of the compiled library: the entry points of :mod:`finesteer.reference`.

    ``load`` returns ``(ok, reason)`` and is cached by :mod:`finesteer._ext`, so calling it on
    every first use is cheap; the ops namespace is bound once it succeeds, so traced code
    (torch.compile) only sees an attribute read afterwards.
    """

    def __init__(self, name: str, device_type: str, load: Callable[[], tuple]):
        self.NAME, self.device_type, self._load, self._ops = name, device_type, load, None

    def __repr__(self) -> str:
        return f"<finesteer backend {self.NAME!r} (torch.ops.{NAMESPACE}, {self.device_type} kernels)>"

    def available(self) -> tuple[bool, str]:
        ok, reason = self._load()
        if ok:
            register_fakes(NAMESPACE)
            self._ops = getattr(torch.ops, NAMESPACE)
        return ok, reason

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == self.device_type

    def ops(self):
        if self._ops is None:
            ok, reason = self.available()
            if not ok:
                raise RuntimeError(f"finesteer {self.NAME} backend is unavailable: {reason}")
        return self._ops

    def steering_vectors(self, h: torch.Tensor, bank: SteeringBank, index: Optional[torch.Tensor]) -> torch.Tensor:
        """λ·g(h)·s(h) per row: ``h`` [T, d], ``index`` [T] or None → fp32 [T, d]."""
        return self.ops().steering_vectors(h, *bank_args(bank), index, GATE_EPS)

    def add_vectors(self, h: torch.Tensor, vectors: torch.Tensor, slot: Optional[torch.Tensor]) -> torch.Tensor:
        """``out[t] = h[t] + vectors[slot[t]]``; ``slot=None``: row t takes vector t."""
        return self.ops().add_vectors(h, vectors, slot)

    def steer_tokens(self, h: torch.Tensor, bank: SteeringBank, index: Optional[torch.Tensor]) -> torch.Tensor:
        """Token mode, fused: every row of ``h`` [T, d] gets its own gate and vector added."""
        return self.ops().steer_tokens(h, *bank_args(bank), index, GATE_EPS)


#: The ``cpu`` backend (registered in :data:`finesteer._backends.BACKENDS`).
CPU = NativeBackend("cpu", "cpu", _ext.load_cpu)
#: The ``cuda`` backend.
CUDA = NativeBackend("cuda", "cuda", _ext.load_cuda)
