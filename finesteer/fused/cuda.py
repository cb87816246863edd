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

import torch

from .. import _ext
from ._native import NativeBackend

NAME = "cuda"
_backend = NativeBackend(NAME, _ext.load_cuda)

available = _backend.available
steering_vectors = _backend.steering_vectors
add_vectors = _backend.add_vectors
steer_tokens = _backend.steer_tokens


def supports(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"
