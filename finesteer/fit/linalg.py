"""Small linear-algebra helpers for fitting: principal directions with a fixed sign convention."""
from __future__ import annotations

import torch

#: Singular values below this fraction of the largest are "null" for the Gram fast path.
_NULL_RTOL = 1e-6


def principal_directions(X: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` right singular vectors of ``X`` [n, d] as the columns of an orthonormal [d, k] fp64 matrix.

    ``X`` is used as given (centre it first for principal components). Each column's sign is
    fixed so that its largest-magnitude entry is positive: singular vectors are defined only up
    to sign, and a fixed convention keeps fits reproducible across LAPACK builds.

    With fewer rows than features (activations: n ≈ 10³, d ≈ 4·10³) the fp64 Gram matrix XXᵀ is
    eigendecomposed instead of running a full SVD (≈ 6× faster at that size); the directions
    are then polished by one QR. When a requested direction has a (near-)zero singular value it
    is not determined by the Gram path, and the full SVD is used instead.
    """
    n, d = X.shape
    if not 1 <= k <= min(n, d):
        raise ValueError(f"principal_directions: k={k} must be in [1, min(n, d)={min(n, d)}]")
    X = X.double()
    if n < d:
        evals, evecs = torch.linalg.eigh(X @ X.T)           # ascending
        evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
        top = float(evals[0]) if n else 0.0
        if top > 0 and float(evals[-1]) > (_NULL_RTOL ** 2) * top:
            V = (X.T @ evecs) / evals.sqrt()
            Q, Rr = torch.linalg.qr(V)
            return fix_signs(Q * torch.sign(Rr.diagonal()))
    _, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return fix_signs(Vh[:k].T.contiguous())


def fix_signs(V: torch.Tensor) -> torch.Tensor:
    """Flip columns of ``V`` [d, k] so that each column's largest-magnitude entry is positive."""
    idx = V.abs().argmax(dim=0)
    signs = torch.sign(V[idx, torch.arange(V.shape[1])])
    signs[signs == 0] = 1
    return V * signs


def orthonormalize(V: torch.Tensor, what: str) -> torch.Tensor:
    """Orthonormal basis of the columns of ``V`` [d, k] (QR, signs kept close to ``V``'s).

    Raises ``ValueError`` when the columns are (numerically) linearly dependent, naming ``what``.
    """
    Q, Rr = torch.linalg.qr(V)
    diag = Rr.diagonal()
    scale = V.norm(dim=0).clamp_min(torch.finfo(V.dtype).tiny)
    if bool((diag.abs() / scale < 1e-6).any()):
        raise ValueError(f"{what}: the columns are linearly dependent (only "
                         f"{int((diag.abs() / scale >= 1e-6).sum())} of {V.shape[1]} independent directions)")
    signs = torch.sign(diag)
    signs[signs == 0] = 1
    return Q * signs
