"""The Triton backend: the fused kernels of :mod:`finesteer._triton.steer` behind the entry points
of :mod:`finesteer.reference` (same signatures, same semantics).

Devices: CUDA tensors when the kernels are compiled (the normal case on a GPU machine); CPU
tensors only when ``TRITON_INTERPRET=1`` was set before the kernels were imported, which runs
them through Triton's (slow) interpreter — how CI tests them without a GPU. Triton fixes the
mode when the kernels are decorated, so the mode of this backend is that of the first import of
:mod:`finesteer._triton.steer` in the process.

Dispatcher ops. Each entry point is one ``torch.library`` custom op,
``torch.ops.finesteer_triton.{steering_vectors, add_vectors, steer_tokens}``, with a fake (shape)
implementation, so ``torch.compile`` traces through the backend without a graph break and a
compiled model (vLLM's compiled mode, CUDA-graph capture of a compiled region) sees one opaque
node per call. A :class:`~finesteer.bank.SteeringBank` cannot be an op argument, so the ops take
the bank's tensors and its sizes ``r, K, H, m`` explicitly (``ptmu``/``mu_sq`` are not read by
the kernels and not passed). The ops allocate their outputs and never alias or modify inputs.

No entry point synchronises host and device or depends on tensor values on the host; index
values are not range-checked here (:func:`finesteer.steer` does that, once): entries outside
``[0, N)`` leave their row unsteered.
"""
# No ``from __future__ import annotations``: torch.library.custom_op reads the real annotations
# to infer each op's schema.
from typing import Optional

import torch

from ._native import bank_args

NAME = "triton"
NAMESPACE = "finesteer_triton"

# The kernels module once loaded; bound in available()/_kernels() so that traced code
# (torch.compile) only reads a plain module global afterwards.
_K = None


def _kernels():
    global _K
    if _K is None:
        from finesteer._triton import steer  # noqa: PLC0415 - lazy: importing triton costs ~1 s

        _K = steer
    return _K


def available() -> tuple:
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


class _BankArgs:
    """The slice of :class:`~finesteer.bank.SteeringBank` the launchers read, rebuilt inside an op
    from its explicit arguments (the launchers take a bank-like object)."""

    __slots__ = ("A", "B", "W2", "mu", "c", "b1", "b2", "gate_mode", "threshold", "temperature", "strength",
                 "r", "K", "H", "m")

    def __init__(self, A, B, W2, mu, c, b1, b2, gate_mode, threshold, temperature, strength, r, K, H, m):
        self.A, self.B, self.W2, self.mu, self.c, self.b1, self.b2 = A, B, W2, mu, c, b1, b2
        self.gate_mode, self.threshold, self.temperature, self.strength = gate_mode, threshold, temperature, strength
        self.r, self.K, self.H, self.m = r, K, H, m

    @property
    def num_steerers(self) -> int:
        return self.A.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.A.shape[1]


def _bank_args(bank) -> tuple:
    """The op arguments standing for ``bank`` (order of :class:`_BankArgs`): the native ops'
    bank arguments plus the padded sizes, which the Triton launchers need as integers."""
    return bank_args(bank) + (bank.r, bank.K, bank.H, bank.m)


# ----------------------------------------------------------------------------------------------
# custom ops (real implementations call the launchers; fakes give shapes and dtypes only)
# ----------------------------------------------------------------------------------------------


# torch < 2.4 has no torch.library.custom_op: there the entry points call the launchers directly
# (eager use works; torch.compile then breaks its graph at each call).
HAS_CUSTOM_OPS = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")

if HAS_CUSTOM_OPS:
    @torch.library.custom_op(f"{NAMESPACE}::steering_vectors", mutates_args=())
    def _steering_vectors_op(h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, W2: torch.Tensor, mu: torch.Tensor,
                             c: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, gate_mode: torch.Tensor,
                             threshold: torch.Tensor, temperature: torch.Tensor, strength: torch.Tensor,
                             r: int, K: int, H: int, m: int, index: Optional[torch.Tensor]) -> torch.Tensor:
        bank = _BankArgs(A, B, W2, mu, c, b1, b2, gate_mode, threshold, temperature, strength, r, K, H, m)
        return _kernels().steering_vectors_forward(h, bank, index)

    @torch.library.custom_op(f"{NAMESPACE}::steer_tokens", mutates_args=())
    def _steer_tokens_op(h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, W2: torch.Tensor, mu: torch.Tensor,
                         c: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, gate_mode: torch.Tensor,
                         threshold: torch.Tensor, temperature: torch.Tensor, strength: torch.Tensor,
                         r: int, K: int, H: int, m: int, index: Optional[torch.Tensor]) -> torch.Tensor:
        bank = _BankArgs(A, B, W2, mu, c, b1, b2, gate_mode, threshold, temperature, strength, r, K, H, m)
        return _kernels().steer_tokens_forward(h, bank, index)

    @torch.library.custom_op(f"{NAMESPACE}::add_vectors", mutates_args=())
    def _add_vectors_op(h: torch.Tensor, vectors: torch.Tensor, slot: Optional[torch.Tensor]) -> torch.Tensor:
        return _kernels().add_vectors_forward(h, vectors, slot)

    def _fake_check_h(h: torch.Tensor, d: int, where: str) -> None:
        # Shape facts the launchers also check; repeated here so a traced graph fails at trace time
        # with the same kind of message instead of producing a wrongly shaped placeholder.
        if h.dim() != 2:
            raise ValueError(f"{where}: h must be 2-D [T, d], got shape {tuple(h.shape)}")
        if h.shape[1] != d:
            raise ValueError(f"{where}: h has hidden size {h.shape[1]}, the bank has {d}")

    @_steering_vectors_op.register_fake
    def _(h, A, B, W2, mu, c, b1, b2, gate_mode, threshold, temperature, strength, r, K, H, m, index):
        """fp32 ``[T, d]``, contiguous."""
        _fake_check_h(h, A.shape[1], "triton steering_vectors")
        return h.new_empty(h.shape, dtype=torch.float32)

    @_steer_tokens_op.register_fake
    def _(h, A, B, W2, mu, c, b1, b2, gate_mode, threshold, temperature, strength, r, K, H, m, index):
        """``[T, d]`` of ``h``'s dtype, contiguous."""
        _fake_check_h(h, A.shape[1], "triton steer_tokens")
        return h.new_empty(h.shape)

    @_add_vectors_op.register_fake
    def _(h, vectors, slot):
        """``[T, d]`` of ``h``'s dtype, contiguous."""
        _fake_check_h(h, vectors.shape[-1], "triton add_vectors")
        return h.new_empty(h.shape)


# ----------------------------------------------------------------------------------------------
# backend entry points (the signatures of finesteer.reference)
# ----------------------------------------------------------------------------------------------


def steering_vectors(h: torch.Tensor, bank, index: Optional[torch.Tensor]) -> torch.Tensor:
    """λ·g(h)·s(h) per row → fp32 [T, d] (index −1: zero row). See :func:`finesteer.reference.steering_vectors`."""
    if not HAS_CUSTOM_OPS:
        return _kernels().steering_vectors_forward(h, bank, index)
    return torch.ops.finesteer_triton.steering_vectors(h, *_bank_args(bank), index)


def add_vectors(h: torch.Tensor, vectors: torch.Tensor, slot: Optional[torch.Tensor]) -> torch.Tensor:
    """``h[t] + vectors[slot[t]]`` (slot −1: unchanged). See :func:`finesteer.reference.add_vectors`."""
    if not HAS_CUSTOM_OPS:
        return _kernels().add_vectors_forward(h, vectors, slot)
    return torch.ops.finesteer_triton.add_vectors(h, vectors, slot)


def steer_tokens(h: torch.Tensor, bank, index: Optional[torch.Tensor]) -> torch.Tensor:
    """Token mode, one fused launch. See :func:`finesteer.reference.steer_tokens`."""
    if not HAS_CUSTOM_OPS:
        return _kernels().steer_tokens_forward(h, bank, index)
    return torch.ops.finesteer_triton.steer_tokens(h, *_bank_args(bank), index)
