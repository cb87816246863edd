"""The steering operator in plain PyTorch: the specification every kernel is tested against,
and the fallback backend on any device (DESIGN §4).

Semantics, for row ``t`` of ``h`` using steerer ``n = index[t]`` of the bank::

    hc    = h − μ_n
    score = ‖P_nᵀ hc‖² / (‖hc‖² + ε)
    g     = {off: 1, hard: 1[score > τ_n], soft: sigmoid((score − τ_n) / T_n)}
    α     = softmax(hᵀR_n + c_n)
    β     = W2_n relu(W1_n h + b1_n) + b2_n
    v     = λ_n · g · ([α ; β] @ B_n)                    # B_n = [V_n ; U_nᵀ]
    out   = h             where v == 0   (closed gate, index −1: bit-identical rows)
            h + v         elsewhere, computed in fp32 and rounded once to h.dtype

All arithmetic is fp32 whatever the input or weight dtype. Nothing here synchronises host and
device: the loop is over the bank's (static) number of steerers, and rows are selected with
``torch.where``, never by indexing with data-dependent shapes.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._constants import GATE_EPS, GATE_HARD, GATE_OFF
from .bank import SteeringBank

NAME = "reference"


def available() -> tuple[bool, str]:
    return True, "plain PyTorch, always available"


def supports(device: torch.device) -> bool:
    return True


def _one_steerer_vectors(h32: torch.Tensor, bank: SteeringBank, n: int) -> torch.Tensor:
    """λ·g·s(h) for every row of ``h32`` [T, d] (fp32) using bank steerer ``n`` → [T, d] fp32."""
    r, K = bank.r, bank.K
    A = bank.A[n].float()
    P, R, W1t = A[:, :r], A[:, r:r + K], A[:, r + K:]

    hc = h32 - bank.mu[n]
    score = (hc @ P).square().sum(-1) / (hc.square().sum(-1) + GATE_EPS)
    hard = (score > bank.threshold[n]).float()
    soft = torch.sigmoid((score - bank.threshold[n]) / bank.temperature[n])
    mode = bank.gate_mode[n]
    gate = torch.where(mode == GATE_OFF, torch.ones_like(score), torch.where(mode == GATE_HARD, hard, soft))

    alpha = torch.softmax(h32 @ R + bank.c[n], dim=-1)
    beta = torch.relu(h32 @ W1t + bank.b1[n]) @ bank.W2[n].float().T + bank.b2[n]
    vec = torch.cat([alpha, beta], dim=-1) @ bank.B[n].float()
    return (bank.strength[n] * gate).unsqueeze(-1) * vec


def steering_vectors(h: torch.Tensor, bank: SteeringBank, index: Optional[torch.Tensor]) -> torch.Tensor:
    """Scaled steering vectors λ·g(h)·s(h), one per row.

    Shape: ``h`` [T, d] (any float dtype); ``index`` [T] integer bank index per row, −1 = none,
    or ``None`` (every row uses steerer 0). Returns fp32 [T, d]; rows with index −1 are zero.
    """
    h32 = h.float()
    out = torch.zeros_like(h32)
    for n in range(bank.num_steerers):
        vec = _one_steerer_vectors(h32, bank, n)
        if index is None:
            return vec
        out = torch.where((index == n).unsqueeze(-1), vec, out)
    return out


def add_vectors(h: torch.Tensor, vectors: torch.Tensor, slot: Optional[torch.Tensor]) -> torch.Tensor:
    """Add cached vectors to rows: ``out[t] = h[t] + vectors[slot[t]]`` (``slot[t] = −1``: unchanged).

    Shape: ``h`` [T, d]; ``vectors`` [S, d] fp32; ``slot`` [T] integer, or ``None`` meaning
    ``S == T`` and row ``t`` takes ``vectors[t]``. Returns a new tensor of ``h``'s dtype; where a
    vector element is exactly zero the output element is ``h``'s, bit for bit.
    """
    if slot is None:
        v = vectors
    else:
        v = vectors[slot.clamp(min=0).long()] * (slot >= 0).unsqueeze(-1)
    summed = (h.float() + v).to(h.dtype)
    return torch.where(v == 0, h, summed)


def steer_tokens(h: torch.Tensor, bank: SteeringBank, index: Optional[torch.Tensor]) -> torch.Tensor:
    """Token mode: every row computes its own gate and vector and gets it added. ``h`` [T, d]."""
    return add_vectors(h, steering_vectors(h, bank, index), None)
