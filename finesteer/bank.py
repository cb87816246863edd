"""The packed, stacked weights every backend reads (DESIGN §4).

A :class:`SteeringBank` holds ``N`` steerers for one hidden size, zero-padded to common sizes
so that one launch can serve a batch whose rows use different steerers (as multi-adapter LoRA
kernels do). Padding is exact:

- extra gate-subspace columns of ``P`` are zero (they add nothing to ‖Pᵀ(h − μ)‖²);
- extra experts get logit bias ``c = −inf`` (softmax weight exactly 0) and zero value rows;
- extra MLP units have zero weights and bias (relu(0) = 0) and zero ``W2`` columns;
- extra residual directions are zero rows of ``B`` with zero ``W2`` rows and ``b2``.

Layout (``J = r + K + H``)::

    A        [N, d, J]     = [P | R | W1ᵀ]         weight dtype (fp32 / bf16 / fp16)
    B        [N, K + m, d] = [V ; Uᵀ]              weight dtype
    W2       [N, m, H]                              weight dtype
    mu       [N, d]      fp32      centre μ of the gate
    c        [N, K]      fp32      routing bias (−inf for padding experts)
    b1       [N, H]      fp32
    b2       [N, m]      fp32
    gate_mode   [N]      int32     GATE_OFF / GATE_HARD / GATE_SOFT (finesteer._constants)
    threshold   [N]      fp32      τ
    temperature [N]      fp32      soft-gate temperature
    strength    [N]      fp32      λ

All tensors are contiguous. Every backend forms ``Pᵀ(h − μ)`` and ``‖h − μ‖²`` from the centred
row itself (expanding them through ``Pᵀμ`` and ``‖μ‖²`` cancels catastrophically on the huge,
nearly constant channels of LLM residual streams), so the bank stores no such precomputed terms. Changing ``strength`` (or τ) in place is allowed and needs no
re-packing, so a captured CUDA graph picks the new value up.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Sequence

import torch

from ._constants import FLOAT_DTYPES, GATE_MODES, GATE_OFF

if TYPE_CHECKING:  # pragma: no cover
    from .steerer import Steerer


@dataclass(eq=False)
class SteeringBank:
    """Packed weights of ``N`` steerers (see the module docstring for the layout)."""

    A: torch.Tensor
    B: torch.Tensor
    W2: torch.Tensor
    mu: torch.Tensor
    c: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    gate_mode: torch.Tensor
    threshold: torch.Tensor
    temperature: torch.Tensor
    strength: torch.Tensor
    r: int
    K: int
    H: int
    m: int
    layers: tuple = ()

    @property
    def num_steerers(self) -> int:
        return self.A.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.A.shape[1]

    @property
    def device(self) -> torch.device:
        return self.A.device

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.A.dtype

    def tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device=None, weight_dtype: torch.dtype | None = None) -> "SteeringBank":
        """Copy to ``device``; ``weight_dtype`` casts the large matrices ``A``, ``B``, ``W2`` only
        (the vectors and scalars stay fp32: they are tiny and the gate threshold needs fp32)."""
        if weight_dtype is not None and weight_dtype not in FLOAT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {FLOAT_DTYPES}, got {weight_dtype}")
        new = {}
        for name, t in self.tensors().items():
            dtype = weight_dtype if (weight_dtype is not None and name in ("A", "B", "W2")) else t.dtype
            new[name] = t.to(device=device, dtype=dtype).contiguous()
        return SteeringBank(**new, r=self.r, K=self.K, H=self.H, m=self.m, layers=self.layers)

    @classmethod
    def from_steerers(cls, steerers: Sequence["Steerer"], device=None,
                      weight_dtype: torch.dtype = torch.float32) -> "SteeringBank":
        """Pack ``steerers`` (all of one hidden size) into a bank; bank index ``i`` is ``steerers[i]``."""
        steerers = list(steerers)
        if not steerers:
            raise ValueError("SteeringBank.from_steerers: need at least one steerer")
        d = steerers[0].hidden_size
        for i, s in enumerate(steerers):
            if s.hidden_size != d:
                raise ValueError(f"SteeringBank.from_steerers: steerer {i} has hidden size {s.hidden_size}, "
                                 f"steerer 0 has {d}; a bank holds one hidden size")
        # Pad every dimension to at least 1 so no backend ever sees a zero-sized operand.
        r = max(1, max(s.gate.rank if s.gate is not None else 0 for s in steerers))
        K = max(s.mose.num_experts for s in steerers)
        H = max(s.mose.mlp_hidden for s in steerers)
        m = max(1, max(s.mose.residual_dim for s in steerers))
        N, J = len(steerers), r + K + H
        f32 = dict(dtype=torch.float32)
        A = torch.zeros(N, d, J, **f32)
        B = torch.zeros(N, K + m, d, **f32)
        W2 = torch.zeros(N, m, H, **f32)
        mu = torch.zeros(N, d, **f32)
        c = torch.full((N, K), float("-inf"), **f32)
        b1 = torch.zeros(N, H, **f32)
        b2 = torch.zeros(N, m, **f32)
        gate_mode = torch.zeros(N, dtype=torch.int32)
        threshold = torch.zeros(N, **f32)
        temperature = torch.ones(N, **f32)
        strength = torch.zeros(N, **f32)
        for i, s in enumerate(steerers):
            mo = s.mose
            k, h_, mm = mo.num_experts, mo.mlp_hidden, mo.residual_dim
            if s.gate is not None:
                rr = s.gate.rank
                A[i, :, :rr] = s.gate.P.float().cpu()
                mu[i] = s.gate.mu.float().cpu()
                threshold[i] = float(s.gate.threshold)
                gate_mode[i] = GATE_MODES[s.gate_mode]
            else:
                gate_mode[i] = GATE_OFF
            A[i, :, r:r + k] = mo.R.float().cpu()
            A[i, :, r + K:r + K + h_] = mo.W1.float().cpu().T
            c[i, :k] = mo.c.float().cpu()
            B[i, :k] = mo.V.float().cpu()
            B[i, K:K + mm] = mo.U.float().cpu().T
            b1[i, :h_] = mo.b1.float().cpu()
            W2[i, :mm, :h_] = mo.W2.float().cpu()
            b2[i, :mm] = mo.b2.float().cpu()
            temperature[i] = float(s.temperature)
            strength[i] = float(s.strength)
        bank = cls(A=A, B=B, W2=W2, mu=mu, c=c, b1=b1, b2=b2,
                   gate_mode=gate_mode, threshold=threshold, temperature=temperature, strength=strength,
                   r=r, K=K, H=H, m=m, layers=tuple(s.layer for s in steerers))
        return bank.to(device=device, weight_dtype=weight_dtype)
