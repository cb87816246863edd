"""Baselines and FineSteer ablations as configurations of the ONE steerer format.

Every method is a :class:`~finesteer.Steerer` (an optional :class:`~finesteer.SCSGate` and a
:class:`~finesteer.MoSE`), so all of them run through the same operator and the same fused kernels
and the comparison is fair. How each maps onto ``out = h + λ·g(h)·(softmax(hᵀR + c) V + U β(h))``:

=============== ============================================= ================================================
method          gate g(h)                                     vector
=============== ============================================= ================================================
``unsteered``   —                                             none (no hook at all)
``caa``         off                                           δ̄ = mean response shift: MoSE with K = 1,
                                                              V = δ̄, zero R, c, residual (CAA)
``cast``        SCS, r = 1, P = unit(mean H_t − mean H_b),    δ̄
                μ = 0, hard at τ: s = cos²(h, P), so          (CAST's condition: the cosine of h with its
                s > τ ⇔ |cos(h, P)| > √τ                      projection on the condition direction)
``alphasteer``  off                                           linear map δ̄ · wᵀ(I − Q_b Q_bᵀ) h, w fitted so the
                                                              map ≈ 1 on target prompts (ridge); Q_b = the
                                                              benign principal subspace. Linear β is exact in
                                                              the relu MLP: β = [I, −I] relu([M; −M] h) = M h
``scs_mean``    the fitted SCS gate (hard, or soft)           δ̄
``mose_nogate`` off                                           the fitted MoSE
``finesteer``   the fitted SCS gate (hard, or soft)           the fitted MoSE
=============== ============================================= ================================================

A linear-probe gate (g = 1[wᵀh + b > 0], as in ITI-style probing) fits the operator too, although
the SCS score ``‖Pᵀ(h−μ)‖²/‖h−μ‖²`` is blind to the sign of ``h − μ``: with P = w and the centre
moved far away (orthogonally to w, and behind the data along −w), the denominator is the same for
every row up to a tiny relative error and the numerator grows with wᵀh, so ``s > τ`` is a threshold
on the probe score. That is the gate option ``fit_scs(method="probe")`` (``--scs-method probe``);
with it, ``scs_mean`` is the probe-gated mean vector and ``finesteer`` the probe-gated MoSE. ITI's
per-head interventions are not a residual-stream operator and are not offered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from ..fit.metrics import auroc, threshold_at_fpr
from ..fit.scs import calibration_split
from ..gate import CalibrationReport, SCSGate
from ..mose import MoSE
from ..steerer import Steerer

__all__ = ["METHODS", "NOT_EXPRESSIBLE", "FitData", "build_methods", "cast_gate", "linear_map_mose",
           "mean_vector_mose"]

#: Every method, in report order.
METHODS = ("unsteered", "caa", "cast", "alphasteer", "scs_mean", "mose_nogate", "finesteer")
#: Methods the operator cannot express, with the reason (reported, never run).
NOT_EXPRESSIBLE = {
    "iti_head_intervention": "ITI shifts individual attention-head outputs; the operator adds one vector to the "
                             "residual stream (its probe gate is expressible: scs_method='probe')",
}


@dataclass
class FitData:
    """Training activations at the steered layer: gate prompts ``target`` [Nt, d], ``benign`` [Nb, d];
    preference pairs ``queries`` [N, d] (h at the last prompt token) and ``deltas`` [N, d]."""

    target: torch.Tensor
    benign: torch.Tensor
    queries: torch.Tensor
    deltas: torch.Tensor


def mean_vector_mose(delta: torch.Tensor) -> MoSE:
    """A MoSE whose vector is the constant ``delta`` [d]: K = 1 (softmax of one logit = 1), V = δ,
    zero routing, zero residual basis and MLP."""
    d = delta.shape[-1]
    z = dict(dtype=torch.float32)
    return MoSE(R=torch.zeros(d, 1, **z), c=torch.zeros(1, **z), V=delta.float().reshape(1, d).clone(),
                U=torch.zeros(d, 1, **z), W1=torch.zeros(1, d, **z), b1=torch.zeros(1, **z),
                W2=torch.zeros(1, 1, **z), b2=torch.zeros(1, **z), fit_stats={"kind": "mean_vector"})


def linear_map_mose(U: torch.Tensor, M: torch.Tensor) -> MoSE:
    """A MoSE whose vector is the linear map ``U M h`` (``U`` [d, m], ``M`` [m, d]), exactly:
    β(h) = W2 relu(W1 h) with W1 = [M; −M], W2 = [I, −I], since relu(x) − relu(−x) = x. The
    expert part contributes zero (K = 1, V = 0)."""
    d, m = U.shape
    if M.shape != (m, d):
        raise ValueError(f"linear_map_mose: U is {tuple(U.shape)}, M must be ({m}, {d}), got {tuple(M.shape)}")
    eye = torch.eye(m)
    return MoSE(R=torch.zeros(d, 1), c=torch.zeros(1), V=torch.zeros(1, d), U=U.float().contiguous(),
                W1=torch.cat([M, -M]).float().contiguous(), b1=torch.zeros(2 * m),
                W2=torch.cat([eye, -eye], dim=1).contiguous(), b2=torch.zeros(m), fit_stats={"kind": "linear_map"})


def cast_gate(target: torch.Tensor, benign: torch.Tensor, max_benign_fpr: float, calib_fraction: float,
              seed: int) -> SCSGate:
    """CAST-style condition as a rank-1 SCS gate with μ = 0: ``s(h) = cos²(h, p)`` with ``p`` the unit
    difference of the target and benign means (fit split), τ calibrated on the same held-out split
    as :func:`finesteer.fit.fit_scs` at ``max_benign_fpr``."""
    split = calibration_split(target.shape[0], benign.shape[0], calib_fraction, seed)
    t_fit, t_cal = target[split["target"][0]].double(), target[split["target"][1]].float()
    b_fit, b_cal = benign[split["benign"][0]].double(), benign[split["benign"][1]].float()
    p = t_fit.mean(0) - b_fit.mean(0)
    norm = float(p.norm())
    if norm == 0.0:
        raise ValueError("cast_gate: the target and benign means coincide; there is no condition direction")
    P = (p / norm).float().reshape(-1, 1).contiguous()
    probe = SCSGate(P=P, mu=torch.zeros(P.shape[0]), threshold=0.0, method="cast")
    s_t, s_b = probe.score(t_cal), probe.score(b_cal)
    tau = threshold_at_fpr(s_b, max_benign_fpr)
    report = CalibrationReport(threshold=tau, tpr=float((s_t > tau).double().mean()),
                               fpr=float((s_b > tau).double().mean()), auroc=auroc(s_t, s_b),
                               n_target=int(s_t.numel()), n_benign=int(s_b.numel()), max_benign_fpr=max_benign_fpr)
    return SCSGate(P=P, mu=torch.zeros(P.shape[0]), threshold=tau, method="cast", report=report)


def alphasteer_mose(target: torch.Tensor, benign: torch.Tensor, delta: torch.Tensor, benign_energy: float = 0.99,
                    ridge: float = 1e-2) -> MoSE:
    """AlphaSteer-style linear steering ``v(h) = δ̄ · wᵀ Π h`` with ``Π = I − Q_b Q_bᵀ``.

    ``Q_b`` [d, k]: the fewest top principal directions of the (uncentred) benign activations that
    hold ``benign_energy`` of their energy, so ``Π h ≈ 0`` on benign prompts (the null-space
    constraint). ``w`` = ridge solution of ``(H_t Π) w ≈ 1`` (the map is ≈ 1 on target prompts) with
    penalty ``ridge · trace(XᵀX)/d``. Rank 1: U = δ̄/‖δ̄‖, M = ‖δ̄‖ · (Π w)ᵀ.
    """
    Hb, Ht, dbar = benign.double(), target.double(), delta.double()
    d = Hb.shape[1]
    _, S, Vh = torch.linalg.svd(Hb, full_matrices=False)
    energy = (S.square().cumsum(0) / S.square().sum())
    k = int((energy < benign_energy).sum()) + 1
    Qb = Vh[:k].T
    X = Ht - (Ht @ Qb) @ Qb.T
    gram = X.T @ X
    lam = ridge * float(gram.diagonal().sum()) / d
    w = torch.linalg.solve(gram + lam * torch.eye(d, dtype=torch.float64), X.T @ torch.ones(X.shape[0], dtype=torch.float64))
    w = w - Qb @ (Qb.T @ w)
    norm = float(dbar.norm())
    if norm == 0.0:
        raise ValueError("alphasteer: the mean response shift is zero")
    mose = linear_map_mose((dbar / norm).reshape(d, 1).float(), (norm * w).reshape(1, d).float())
    mose.fit_stats.update({"benign_rank": k, "benign_energy": benign_energy, "ridge": ridge})
    return mose


def build_methods(data: FitData, names: Sequence[str], layer: int, gate: Optional[SCSGate] = None,
                  mose: Optional[MoSE] = None, max_benign_fpr: float = 0.05, calib_fraction: float = 0.2,
                  seed: int = 0, gate_mode: str = "hard", temperature: Optional[float] = None) -> Dict[str, Optional[Steerer]]:
    """Build the steerers (strength 1) of ``names`` from ``data``; ``unsteered`` maps to ``None``.

    ``gate`` / ``mose``: the fitted FineSteer SCS gate and MoSE (needed by ``scs_mean``,
    ``mose_nogate`` and ``finesteer``). ``gate_mode``: how ``scs_mean`` and ``finesteer`` use that
    gate, ``"hard"`` or ``"soft"`` with ``temperature`` (in score units); CAST keeps its hard threshold.
    """
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if gate_mode not in ("hard", "soft"):
        raise ValueError(f"gate_mode must be 'hard' or 'soft', got {gate_mode!r}")
    if gate_mode == "soft" and not (temperature is not None and temperature > 0):
        raise ValueError(f"a soft gate needs a temperature > 0, got {temperature!r}")
    gated = {"gate_mode": "hard"} if gate_mode == "hard" else {"gate_mode": "soft", "temperature": temperature}
    dbar = data.deltas.double().mean(0).float()
    out: Dict[str, Optional[Steerer]] = {}
    for name in names:
        if name in ("scs_mean", "finesteer") and gate is None:
            raise ValueError(f"method {name!r} needs the fitted SCS gate")
        if name in ("mose_nogate", "finesteer") and mose is None:
            raise ValueError(f"method {name!r} needs the fitted MoSE")
        if name == "unsteered":
            out[name] = None
        elif name == "caa":
            out[name] = Steerer(mose=mean_vector_mose(dbar), layer=layer)
        elif name == "cast":
            out[name] = Steerer(gate=cast_gate(data.target, data.benign, max_benign_fpr, calib_fraction, seed),
                                mose=mean_vector_mose(dbar), layer=layer, gate_mode="hard")
        elif name == "alphasteer":
            out[name] = Steerer(mose=alphasteer_mose(data.target, data.benign, dbar), layer=layer)
        elif name == "scs_mean":
            out[name] = Steerer(gate=gate, mose=mean_vector_mose(dbar), layer=layer, **gated)
        elif name == "mose_nogate":
            out[name] = Steerer(mose=mose, layer=layer)
        elif name == "finesteer":
            out[name] = Steerer(gate=gate, mose=mose, layer=layer, **gated)
    return out


def with_strength(steerer: Optional[Steerer], strength: float) -> Optional[Steerer]:
    """A copy of ``steerer`` (sharing its tensors) at ``strength``; ``None`` stays ``None``."""
    if steerer is None:
        return None
    return Steerer(gate=steerer.gate, mose=steerer.mose, strength=strength, layer=steerer.layer,
                   gate_mode=steerer.gate_mode, temperature=steerer.temperature, metadata=steerer.metadata)
