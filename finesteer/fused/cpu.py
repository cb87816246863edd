"""``cpu`` backend: the fused C++ operator in ``csrc/cpu/steer_cpu.cpp`` (DESIGN §4).

Same entry points and semantics as :mod:`finesteer.reference`; the work runs in one dispatcher
op per call (``torch.ops.finesteer_ext.*``), multithreaded with ATen's intra-op thread pool.
The extension is built or loaded on first use by :mod:`finesteer._ext`; when that is impossible
(no compiler, a wheel without the prebuilt module, ``FINESTEER_DISABLE_EXT=1``) ``available()``
says why and the dispatcher falls back to the reference.
"""
from __future__ import annotations

import torch

from .. import _ext
from ._native import NativeBackend

NAME = "cpu"
_backend = NativeBackend(NAME, _ext.load_cpu)

available = _backend.available
steering_vectors = _backend.steering_vectors
add_vectors = _backend.add_vectors
steer_tokens = _backend.steer_tokens


def supports(device: torch.device) -> bool:
    return torch.device(device).type == "cpu"
