"""The one schema of the fused operator's dispatcher ops and their one set of fake kernels.

Both fused libraries expose the same three ops with the same arguments:

* ``torch.ops.finesteer_ext.*``: the C++ kernels (``csrc/ops.cpp`` holds the same schema text in
  its ``TORCH_LIBRARY`` block; CPU and CUDA kernels register under it), see
  :mod:`finesteer.fused.native`;
* ``torch.ops.finesteer_triton.*``: the Triton kernels, defined from :data:`SCHEMAS` in
  :mod:`finesteer.fused.triton`.

Schemas (bank arguments in the order of :func:`bank_args`; ``J = r + K + H``)::

    steering_vectors(h [T, d], A [N, d, J], B [N, K + m, d], W2 [N, m, H], mu [N, d], c [N, K],
                     b1 [N, H], b2 [N, m], gate_mode [N] int32, threshold [N], temperature [N],
                     strength [N], index [T] int32/int64 or None, eps) -> fp32 [T, d]
    steer_tokens(<the same arguments>) -> [T, d] of h's dtype
    add_vectors(h [T, d], vectors [S, d] fp32, slot [T] int32/int64 or None) -> [T, d] of h's dtype

The sizes ``r, K, H, m`` are not arguments: they follow from the shapes (:func:`bank_from_args`), so
no caller can pass sizes that disagree with the tensors. The fakes (shape-only kernels, so
``torch.compile`` traces through the ops) are registered for both namespaces from this module.
"""
from __future__ import annotations

import torch

from ..bank import SteeringBank

#: The bank's tensors, in the order the steer ops take them (after ``h``).
BANK_ARGS = ("A", "B", "W2", "mu", "c", "b1", "b2", "gate_mode", "threshold", "temperature", "strength")

_BANK_PARAMS = ", ".join(f"Tensor {name}" for name in BANK_ARGS)

#: Op name → schema (without the name). ``csrc/ops.cpp`` defines ``finesteer_ext`` with this text.
SCHEMAS = {
    "steering_vectors": f"(Tensor h, {_BANK_PARAMS}, Tensor? index, float eps) -> Tensor",
    "steer_tokens": f"(Tensor h, {_BANK_PARAMS}, Tensor? index, float eps) -> Tensor",
    "add_vectors": "(Tensor h, Tensor vectors, Tensor? slot) -> Tensor",
}

#: True when this torch can register fake kernels (``torch.library.register_fake``, torch ≥ 2.4).
#: Without it the ops still run eagerly; only tracing with fake tensors needs the fakes.
HAS_REGISTER_FAKE = hasattr(torch.library, "register_fake")


def bank_args(bank: SteeringBank) -> tuple:
    """The bank's tensors in schema order (splat them into an op call: ``op(h, *bank_args(bank), ...)``)."""
    return tuple(getattr(bank, name) for name in BANK_ARGS)


def bank_from_args(*tensors: torch.Tensor) -> SteeringBank:
    """The inverse of :func:`bank_args` inside an op: a :class:`SteeringBank` view of the tensors
    (no copy), with ``r, K, H, m`` read off the shapes (``J = r + K + H`` columns of ``A``)."""
    named = dict(zip(BANK_ARGS, tensors))
    K, H, m = named["c"].shape[-1], named["b1"].shape[-1], named["b2"].shape[-1]
    return SteeringBank(**named, r=named["A"].shape[-1] - K - H, K=K, H=H, m=m)


def _check_fake_h(h: torch.Tensor, d: int, where: str) -> None:
    # Shape facts the kernels also check, repeated so that a traced graph fails at trace time with
    # the same kind of message instead of producing a wrongly shaped placeholder.
    if h.dim() != 2:
        raise ValueError(f"{where}: h must be 2-D [T, d], got shape {tuple(h.shape)}")
    if h.shape[1] != d:
        raise ValueError(f"{where}: h has hidden size {h.shape[1]}, the bank has {d}")


def _fake_steering_vectors(h, A, B, W2, mu, c, b1, b2, gate_mode, threshold, temperature, strength, index, eps):
    """fp32 ``[T, d]``, contiguous."""
    _check_fake_h(h, A.shape[1], "steering_vectors")
    return h.new_empty(h.shape, dtype=torch.float32)


def _fake_steer_tokens(h, A, B, W2, mu, c, b1, b2, gate_mode, threshold, temperature, strength, index, eps):
    """``[T, d]`` of ``h``'s dtype, contiguous."""
    _check_fake_h(h, A.shape[1], "steer_tokens")
    return h.new_empty(h.shape)


def _fake_add_vectors(h, vectors, slot):
    """``[T, d]`` of ``h``'s dtype, contiguous."""
    _check_fake_h(h, vectors.shape[-1], "add_vectors")
    return h.new_empty(h.shape)


FAKES = {"steering_vectors": _fake_steering_vectors, "steer_tokens": _fake_steer_tokens,
         "add_vectors": _fake_add_vectors}

_faked: set = set()


def register_fakes(namespace: str) -> None:
    """Register :data:`FAKES` for the ops of ``namespace`` (once per process; needs the ops defined)."""
    if namespace in _faked or not HAS_REGISTER_FAKE:
        return
    _faked.add(namespace)
    for name, fake in FAKES.items():
        try:
            torch.library.register_fake(f"{namespace}::{name}")(fake)
        except RuntimeError as exc:  # a fake registered by an earlier copy of this module (reload)
            if "already has" not in str(exc) and "already registered" not in str(exc):
                raise
