"""The steering operator in plain PyTorch: the specification every kernel is tested against,
and the fallback backend on any device (DESIGN §4).

Semantics, for row ``t`` of ``h`` using steerer ``n = index[t]`` of the bank::

    hc    = h − μ_n
    score = ‖P_nᵀ hc‖² / (‖hc‖² + ε)
    g     = {off: 1, hard: 1[score > τ_n], soft: sigmoid((score − τ_n) / T_n)}
    α     = softmax(hᵀR_n + c_n)
    β     = W2_n relu(W1_n h + b1_n) + b2_n
    v     = λ_n · g · ([α ; β] @ B_n)                    # B_n = [V_n ; U_nᵀ]
    out   = h             where v == 0   (closed gate, unsteered row: bit-identical elements)
            h + v         elsewhere, computed in fp32 and rounded once to h.dtype

All arithmetic is fp32 whatever the input or weight dtype. Nothing here synchronises host and
device: the loop is over the bank's (static) number of steerers, and rows are selected with
``torch.where``, never by indexing with data-dependent shapes.

Index and slot contract — the one every backend (reference, cpu, cuda, triton) obeys, and
``tests/test_backends.py`` checks on each of them:

- ``index[t]`` in ``[0, N)`` selects bank steerer ``index[t]``; ``index=None`` means every row
  uses steerer 0.
- Every other value — ``−1`` ("unsteered"), any other negative number, ``N`` or more — is
  treated exactly as ``−1``: the row comes back bit-identical to ``h`` (its steering vector is
  0). No backend raises on an index *value* (on a GPU that check needs a host–device sync) and
  none reads outside the bank.
- ``slot[t]`` of :func:`add_vectors` follows the same rule over ``[0, S)``.
- The public, validating entry point :func:`finesteer.steer` (with its default
  ``check_index_range=True``) raises ``IndexError`` for an index outside ``[−1, N)`` before
  dispatching to any backend; the hot paths of the integrations validate once up front and
  call the backends directly.
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

    Shape: ``h`` [T, d] (any float dtype); ``index`` [T] integer bank index per row (−1 and any
    other value outside ``[0, N)``: none), or ``None`` (every row uses steerer 0). Returns fp32
    [T, d]; unsteered rows are zero.
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
    """Add cached vectors to rows: ``out[t] = h[t] + vectors[slot[t]]``.

    Shape: ``h`` [T, d]; ``vectors`` [S, d] fp32; ``slot`` [T] integer (−1 and any other value
    outside ``[0, S)``: row unchanged), or ``None`` meaning ``S == T`` and row ``t`` takes
    ``vectors[t]``. Returns a new tensor of ``h``'s dtype; where a vector element is exactly zero
    the output element is ``h``'s, bit for bit.
    """
    if slot is None:
        v = vectors
    elif vectors.shape[0] == 0:  # no vector to take: every slot is out of range
        v = vectors.new_zeros(h.shape)
    else:
        valid = ((slot >= 0) & (slot < vectors.shape[0])).unsqueeze(-1)
        # Gather with a clamped (always valid) slot, then select: no data-dependent shapes, no sync.
        gathered = vectors[slot.clamp(0, vectors.shape[0] - 1).long()]
        v = torch.where(valid, gathered, gathered.new_zeros(()))
    summed = (h.float() + v).to(h.dtype)
    return torch.where(v == 0, h, summed)


def steer_tokens(h: torch.Tensor, bank: SteeringBank, index: Optional[torch.Tensor]) -> torch.Tensor:
    """Token mode: every row computes its own gate and vector and gets it added. ``h`` [T, d]."""
    return add_vectors(h, steering_vectors(h, bank, index), None)
