"""Fitting the SCS gate (DESIGN §2): a target subspace ``P``, a centre ``μ`` and a calibrated τ.

The fit returns the inference-time container :class:`finesteer.gate.SCSGate`; everything here
runs once, offline, on the CPU in fp64.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..gate import CalibrationReport, SCSGate
from ._validate import (as_matrix, check_choice, check_int, check_real, child_generator,
                        holdout_split)
from .linalg import fix_signs, orthonormalize, principal_directions
from .metrics import auroc, threshold_at_fpr

METHODS = ("energy", "contrastive", "discriminant", "probe")
#: Ridge added to the benign second moment by ``discriminant``, relative to its mean eigenvalue:
#: keeps the generalised eigenproblem well posed when benign rows span fewer than d directions.
DISCRIMINANT_RIDGE = 1e-2
CENTERS = ("benign", "target", "all")
#: ``probe``: ridge added to the pooled within-class covariance, relative to its mean eigenvalue.
#: Strong shrinkage (the direction stays close to the plain mean difference) is what generalises
#: from one prompt collection to another; see docs/quality.md for the study behind the value.
PROBE_RIDGE = 1.0
#: ``probe``: the anchor distance u in units of the largest centred fit-row norm, and the offset t
#: in units of the largest |probe coordinate| of a fit row (see :func:`_probe_geometry`). The
#: ordering error relative to the probe is O(1/PROBE_ANCHOR²) plus a tiny O(1/PROBE_ANCHOR) term;
#: scores are then ~(PROBE_OFFSET/PROBE_ANCHOR)²-sized, still far above fp32's smallest normals.
PROBE_ANCHOR = 1000.0
PROBE_OFFSET = 3.0
_WHERE = "fit_scs"


def calibration_split(n_target: int, n_benign: int, calib_fraction: float = 0.2, seed: int = 0) -> dict:
    """The seeded (fit, held-out) row split used by :func:`fit_scs`.

    Returns ``{"target": (fit_idx, held_idx), "benign": (fit_idx, held_idx)}`` (sorted int64
    index tensors). Each held-out part is ``max(1, round(calib_fraction·n))`` rows; the same
    ``seed`` always gives the same split, so a caller can re-score exactly the rows τ was
    calibrated on.
    """
    g = child_generator(seed, 0)
    return {"target": holdout_split(n_target, calib_fraction, g, "target", _WHERE),
            "benign": holdout_split(n_benign, calib_fraction, g, "benign", _WHERE)}


#: Subspace rank when none is given (the ``probe`` gate is always rank 1).
DEFAULT_RANK = 16


def fit_scs(target, benign, rank: Optional[int] = None, method: str = "energy", max_benign_fpr: float = 0.05,
            calib_fraction: float = 0.2, seed: int = 0, center: str = "benign",
            benign_rank: Optional[int] = None, probe_ridge: float = PROBE_RIDGE) -> SCSGate:
    """Fit an SCS gate from target activations ``target`` [Nt, d] and benign activations ``benign`` [Nb, d].

    Semantics::

        split    each of target / benign into a fit part and a held-out part (calib_fraction, seeded)
        μ        mean of the benign fit part  (center="target": of the target fit part; "all": of both)
        energy:      P = top-r right singular vectors of (H_t − μ)
        contrastive: Q_b = top-r_b right singular vectors of (H_b − μ);
                     P = top-r right singular vectors of (H_t − μ)(I − Q_b Q_bᵀ), re-orthonormalised
                     in the complement of span(Q_b)
        probe:       a linear probe written in the SCS form (rank 1): w = unit Fisher direction
                     (Σ_t + Σ_b + ρ·tr/d·I)⁻¹(mean H_t − mean H_b), ρ = probe_ridge, with one
                     coordinate j zeroed; P = w and the centre moved far away, μ' = μ − t·w − u·e_j
                     (t = PROBE_OFFSET·max|wᵀ(h − μ)|, u = PROBE_ANCHOR·max‖h − μ‖ over fit rows).
                     Then s(h) = (a + t)² / ((a + t)² + (b + u)² + o²) with a = wᵀ(h − μ),
                     b = h_j − μ_j, o the rest: for a > −t it increases with a, and (b + u)² + o²
                     is u² to a relative O(|b|/u + ‖h − μ‖²/u²), so thresholding s is thresholding
                     the probe score a; unlike a sign-blind subspace gate it stays closed on rows
                     far out on the benign side (scores are tiny, ~(t/u)²: a soft gate needs a
                     temperature on that scale)
        discriminant: S_t = (H_t − μ)ᵀ(H_t − μ)/N_t, S_b likewise + ρ·tr(S_b)/d·I (ρ = DISCRIMINANT_RIDGE);
                     P = orthonormalised top-r generalised eigenvectors of S_t w = γ S_b w, i.e. the
                     directions where targets carry the most energy *relative to* benign rows (the
                     energy fraction s(h) is then high on targets and low on benign rows)
        s(h)     = ‖Pᵀ(h − μ)‖² / (‖h − μ‖² + ε)              # ε = GATE_EPS, s ∈ [0, 1]
        τ        = smallest threshold with held-out benign FPR = mean(s_b > τ) ≤ max_benign_fpr,
                   i.e. the operating point with the largest allowed false-positive rate and so the
                   highest TPR (the gate is hard: g = 1[s > τ]); this is DESIGN §2's convention

    The calibration scores are computed by the returned gate's own :meth:`~SCSGate.score` (fp32),
    so the reported TPR/FPR are exactly what the gate does on the held-out rows; AUROC is the rank
    statistic with ties counted half. Use :func:`calibration_split` to recover the held-out rows.

    Args:
        target, benign: float tensors or arrays [N, d] (any dtype/device; fitted in fp64 on the CPU).
        rank: r, the subspace dimension; 1 ≤ r ≤ min(target fit rows, d) (contrastive: ≤ d − r_b;
            probe: exactly 1). None: DEFAULT_RANK (probe: 1).
        method: ``"energy"``, ``"contrastive"``, ``"discriminant"`` or ``"probe"``.
        max_benign_fpr: bound on the held-out benign false-positive rate, in [0, 1).
        calib_fraction: fraction of each of target and benign held out for calibration, in (0, 1).
        seed: seeds the split (the fit itself is deterministic).
        center: ``"benign"`` (default), ``"target"`` or ``"all"``.
        benign_rank: r_b for ``contrastive`` (default ``rank``; 0 makes it ``energy``); ignored by ``energy``.
        probe_ridge: ρ of ``probe``, relative to the mean eigenvalue of the pooled within-class
            covariance (> 0; default PROBE_RIDGE); ignored by the other methods.

    Returns: :class:`SCSGate` with ``P`` fp32 [d, r] (orthonormal columns), ``mu`` fp32 [d],
    ``threshold`` τ, ``method`` and a :class:`CalibrationReport` of the held-out split.
    """
    Ht = as_matrix(target, "target", _WHERE)
    Hb = as_matrix(benign, "benign", _WHERE)
    if Ht.shape[1] != Hb.shape[1]:
        raise ValueError(f"{_WHERE}: hidden size mismatch: target has {Ht.shape[1]} features, benign has "
                         f"{Hb.shape[1]}")
    d = Ht.shape[1]
    check_choice(method, "method", _WHERE, METHODS)
    check_choice(center, "center", _WHERE, CENTERS)
    max_benign_fpr = check_real(max_benign_fpr, "max_benign_fpr", _WHERE, 0.0, 1.0, high_open=True)
    calib_fraction = check_real(calib_fraction, "calib_fraction", _WHERE, 0.0, 1.0, low_open=True, high_open=True)
    seed = check_int(seed, "seed", _WHERE, 0)
    if rank is None:
        rank = 1 if method == "probe" else DEFAULT_RANK
    rank = check_int(rank, "rank", _WHERE, 1)
    probe_ridge = check_real(probe_ridge, "probe_ridge", _WHERE, 0.0, math.inf, low_open=True, high_open=True)

    split = calibration_split(Ht.shape[0], Hb.shape[0], calib_fraction, seed)
    t_fit, t_cal = Ht[split["target"][0]], Ht[split["target"][1]]
    b_fit, b_cal = Hb[split["benign"][0]], Hb[split["benign"][1]]

    limit = min(t_fit.shape[0], d)
    if rank > limit:
        raise ValueError(f"{_WHERE}: rank={rank} exceeds min(target fit rows={t_fit.shape[0]}, hidden size={d}) "
                         f"= {limit}")

    mu = {"benign": b_fit, "target": t_fit, "all": torch.cat([t_fit, b_fit])}[center].mean(0)
    if method == "probe":
        if rank != 1:
            raise ValueError(f"{_WHERE}: method='probe' is a rank-1 gate by construction; got rank={rank} (pass rank=1)")
        P, mu = _probe_geometry(t_fit, b_fit, mu, probe_ridge)
    elif method == "energy":
        P = principal_directions(t_fit - mu, rank)
    elif method == "discriminant":
        P = _discriminant_subspace(t_fit - mu, b_fit - mu, rank)
    else:
        r_b = rank if benign_rank is None else check_int(benign_rank, "benign_rank", _WHERE, 0)
        P = _contrastive_subspace(t_fit - mu, b_fit - mu, rank, r_b)

    P32, mu32 = P.float().contiguous(), mu.float().contiguous()
    probe = SCSGate(P=P32, mu=mu32, threshold=0.0, method=method)
    s_t, s_b = probe.score(t_cal.float()), probe.score(b_cal.float())
    tau = threshold_at_fpr(s_b, max_benign_fpr)
    report = CalibrationReport(threshold=tau, tpr=float((s_t > tau).double().mean()),
                               fpr=float((s_b > tau).double().mean()), auroc=auroc(s_t, s_b),
                               n_target=int(s_t.numel()), n_benign=int(s_b.numel()),
                               max_benign_fpr=max_benign_fpr)
    return SCSGate(P=P32, mu=mu32, threshold=tau, method=method, report=report)


def recalibrate_scs(gate: SCSGate, target, benign, max_benign_fpr: float = 0.05) -> SCSGate:
    """The same gate with its threshold chosen again, on new prompts, at a new benign budget.

    Semantics: ``P``, ``μ`` and the method are kept; τ = the smallest threshold with benign FPR
    ``mean(s_b > τ) ≤ max_benign_fpr`` over the scores of ``benign`` [Nb, d] (:func:`fit_scs`'s
    rule), and the returned gate's :class:`CalibrationReport` gives τ's TPR on ``target`` [Nt, d],
    its FPR on ``benign`` and the AUROC of the two. Use prompts the gate was not fitted on (its own
    fit rows would understate the false-positive rate on new ones): e.g. a held-out benign set in the
    traffic's style, to move an existing artifact to another operating point without refitting.

    Args:
        gate: the fitted gate (not modified).
        target, benign: float tensors or arrays [N, d] with the gate's hidden size (any dtype/device).
        max_benign_fpr: bound on the benign false-positive rate, in [0, 1).

    Returns: a new :class:`SCSGate` sharing ``gate``'s ``P`` and ``mu`` tensors.
    """
    if not isinstance(gate, SCSGate):
        raise TypeError(f"recalibrate_scs: gate must be an SCSGate, got {type(gate).__name__}")
    where = "recalibrate_scs"
    Ht = as_matrix(target, "target", where)
    Hb = as_matrix(benign, "benign", where)
    for name, H in (("target", Ht), ("benign", Hb)):
        if H.shape[1] != gate.hidden_size:
            raise ValueError(f"{where}: {name} has {H.shape[1]} features, the gate's hidden size is "
                             f"{gate.hidden_size}")
    max_benign_fpr = check_real(max_benign_fpr, "max_benign_fpr", where, 0.0, 1.0, high_open=True)
    s_t = gate.score(Ht.float().to(gate.P.device))
    s_b = gate.score(Hb.float().to(gate.P.device))
    tau = threshold_at_fpr(s_b, max_benign_fpr)
    report = CalibrationReport(threshold=tau, tpr=float((s_t > tau).double().mean()),
                               fpr=float((s_b > tau).double().mean()), auroc=auroc(s_t, s_b),
                               n_target=int(s_t.numel()), n_benign=int(s_b.numel()),
                               max_benign_fpr=max_benign_fpr)
    return SCSGate(P=gate.P, mu=gate.mu, threshold=tau, method=gate.method, report=report)


def _contrastive_subspace(Xt: torch.Tensor, Xb: torch.Tensor, rank: int, r_b: int) -> torch.Tensor:
    """Top-``rank`` directions of centred target rows ``Xt`` outside the top-``r_b`` principal
    subspace of centred benign rows ``Xb``: the energy that benign activations do not also carry."""
    d = Xt.shape[1]
    if r_b > min(Xb.shape[0], d):
        raise ValueError(f"{_WHERE}: benign_rank={r_b} exceeds min(benign fit rows={Xb.shape[0]}, hidden size={d})")
    if rank + r_b > d:
        raise ValueError(f"{_WHERE}: rank={rank} + benign_rank={r_b} exceeds the hidden size {d}: the target "
                         "subspace must fit in the complement of the benign one")
    if r_b == 0:
        return principal_directions(Xt, rank)
    Qb = principal_directions(Xb, r_b)
    Y = Xt - (Xt @ Qb) @ Qb.T
    P = principal_directions(Y, rank)
    # Projecting again removes the rounding leak into span(Q_b); it matters for directions with
    # (near-)zero singular value, which the SVD may return anywhere in the null space of Y.
    P = P - Qb @ (Qb.T @ P)
    try:
        P = orthonormalize(P, "contrastive subspace")
    except ValueError:
        raise ValueError(f"{_WHERE}: the target data has fewer than rank={rank} directions outside the top-{r_b} "
                         "benign subspace; lower rank or benign_rank") from None
    return fix_signs(P)


def _discriminant_subspace(Xt: torch.Tensor, Xb: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` generalised eigenvectors of (S_t, S_b + ridge), orthonormalised [d, rank] (fp64).

    With L Lᵀ = S_b + ridge (Cholesky) the problem is the symmetric eigenproblem of
    L⁻¹ S_t L⁻ᵀ; its eigenvectors v map back to w = L⁻ᵀ v. Cost: two d×d products and one d×d
    eigendecomposition (d = 4096: seconds).
    """
    d = Xt.shape[1]
    St = Xt.T @ Xt / Xt.shape[0]
    Sb = Xb.T @ Xb / Xb.shape[0]
    ridge = DISCRIMINANT_RIDGE * float(Sb.diagonal().mean()) or 1.0
    L = torch.linalg.cholesky(Sb + ridge * torch.eye(d, dtype=Sb.dtype))
    A = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, St, upper=False).T, upper=False)
    evals, evecs = torch.linalg.eigh((A + A.T) / 2)  # ascending
    V = evecs[:, evals.argsort(descending=True)[:rank]]
    W = torch.linalg.solve_triangular(L.T, V, upper=True)
    return fix_signs(orthonormalize(W, f"{_WHERE}: discriminant subspace"))


def _probe_geometry(Xt: torch.Tensor, Xb: torch.Tensor, m: torch.Tensor,
                    ridge_rel: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(P [d, 1], μ' [d]) (fp64) of the ``probe`` method: an SCS gate whose score orders rows as
    the Fisher probe a = wᵀ(h − m) does (see :func:`fit_scs`).

    Why it works: the score is the fraction of ‖h − μ'‖² along w. Seen from a centre u ≫ ‖h − m‖
    away along a direction v ⟂ w, the denominator is u² for every row up to a relative
    O(|b|/u + ‖h − m‖²/u²), while the numerator (a + t)² still varies by O(1) across rows.

    v is a coordinate axis e_j, and w_j is set to 0 (then w renormalised): v ⟂ w then holds
    exactly in every weight dtype — a bf16 copy of P rounds w_j = 0 to 0, so the huge u never
    leaks into Pᵀ(h − μ') — and b = h_j − m_j. j is the least-varying coordinate of the fit rows
    among the half with the smallest |w_j| (small b, and zeroing w_j barely moves the probe).
    The kernels form h − μ' per element in fp32 (no ‖μ'‖² expansion), so nothing cancels.
    """
    d = Xt.shape[1]
    if d < 2:
        raise ValueError(f"{_WHERE}: method='probe' needs a hidden size of at least 2, got {d}")
    Ct, Cb = Xt - Xt.mean(0), Xb - Xb.mean(0)
    Sw = (Ct.T @ Ct + Cb.T @ Cb) / max(1, Ct.shape[0] + Cb.shape[0] - 2)
    ridge = ridge_rel * float(Sw.diagonal().mean()) or 1.0
    w = torch.linalg.solve(Sw + ridge * torch.eye(d, dtype=Sw.dtype), Xt.mean(0) - Xb.mean(0))
    X = torch.cat([Xt, Xb]) - m
    small = w.abs().argsort()[:max(1, d // 2)]
    j = int(small[X[:, small].std(0, correction=0).argmin()])
    w[j] = 0.0
    norm = float(w.norm())
    if not norm > 0.0:
        raise ValueError(f"{_WHERE}: method='probe': target and benign fit rows have the same mean; there is no "
                         "direction to probe")
    w = w / norm
    a = X @ w
    t = PROBE_OFFSET * float(a.abs().max())
    u = PROBE_ANCHOR * float(X.norm(dim=1).max())
    mu = m - t * w
    mu[j] -= u
    return w[:, None].contiguous(), mu
