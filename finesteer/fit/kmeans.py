"""Seeded K-means (greedy k-means++ init, Lloyd iterations, restarts) and the Calinski–Harabasz
index used to choose the number of MoSE experts (DESIGN §3, step 1).

Everything is fp64 torch on the CPU and uses only the generator passed in, so a fit is
reproducible and leaves the global RNG alone. Memory is O(N·K), never O(N²).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    """``centers`` [K, p], ``labels`` [N] (int64), ``inertia`` = Σ‖x − c_label‖², ``n_iter`` Lloyd steps."""

    centers: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int

    @property
    def sizes(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.centers.shape[0])


def cluster_sums(X: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Σ of the rows of X [N, p] in each cluster → [K, p].

    A one-hot matmul rather than ``index_add_``: the latter is orders of magnitude slower on a
    multi-threaded CPU here (it serialises on the destination rows), and this is Lloyd's inner loop.
    """
    onehot = torch.nn.functional.one_hot(labels, k).to(X.dtype)
    return onehot.T @ X


def _sq_dists(X: torch.Tensor, x_sq: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """‖x − c‖² for every row of X [N, p] and C [K, p] → [N, K], clamped at 0 (rounding)."""
    return (x_sq[:, None] - 2.0 * (X @ C.T) + C.square().sum(1)[None, :]).clamp_min_(0.0)


def kmeans_plusplus(X: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding: each new centre is the best (lowest potential) of
    ``2 + ⌊ln k⌋`` candidates drawn with probability ∝ squared distance to the nearest centre."""
    n = X.shape[0]
    x_sq = X.square().sum(1)
    n_local = 2 + int(math.log(k))
    idx = [int(torch.randint(n, (1,), generator=generator))]
    closest = _sq_dists(X, x_sq, X[idx]).squeeze(1)
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:  # every point coincides with a centre: any choice is as good
            cand = torch.randint(n, (n_local,), generator=generator)
        else:
            cand = torch.multinomial(closest / total, n_local, replacement=True, generator=generator)
        d_cand = torch.minimum(closest[None, :], _sq_dists(X, x_sq, X[cand]).T)  # [n_local, N]
        best = int(d_cand.sum(1).argmin())
        idx.append(int(cand[best]))
        closest = d_cand[best]
    return X[idx].clone()


def lloyd(X: torch.Tensor, centers: torch.Tensor, max_iter: int = 100) -> KMeansResult:
    """Lloyd iterations from ``centers`` until the assignment stops changing (or ``max_iter``).

    An emptied cluster is re-seeded with the point farthest from its current centre, so the
    result always has K non-empty clusters (N ≥ K; duplicate rows may give equal centres).
    """
    k = centers.shape[0]
    x_sq = X.square().sum(1)
    C = centers.clone()
    labels = None
    it = 0
    for it in range(1, max_iter + 1):
        dist = _sq_dists(X, x_sq, C)
        new = dist.argmin(1)
        counts = torch.bincount(new, minlength=k)
        for j in (counts == 0).nonzero().flatten().tolist():
            own = dist.gather(1, new[:, None]).squeeze(1)
            own[counts[new] <= 1] = -1.0  # never empty another cluster to fill this one
            far = int(own.argmax())
            counts[new[far]] -= 1
            new[far] = j
            counts[j] = 1
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        C = cluster_sums(X, labels, k) / counts[:, None].to(X.dtype)
    inertia = float((X - C[labels]).square().sum())
    return KMeansResult(centers=C, labels=labels, inertia=inertia, n_iter=it)


def kmeans(X: torch.Tensor, k: int, generator: torch.Generator, n_init: int = 4, max_iter: int = 100) -> KMeansResult:
    """Best of ``n_init`` k-means++ + Lloyd runs (lowest inertia; the first wins ties)."""
    if not 1 <= k <= X.shape[0]:
        raise ValueError(f"kmeans: k={k} must be in [1, N={X.shape[0]}]")
    X = X.double()
    best = None
    for _ in range(n_init):
        res = lloyd(X, kmeans_plusplus(X, k, generator), max_iter)
        if best is None or res.inertia < best.inertia:
            best = res
    return best


def calinski_harabasz(X: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Calinski–Harabasz index: [B / (K − 1)] / [W / (N − K)], higher is better.

    B = Σ_j n_j‖c_j − x̄‖² (between-cluster), W = Σ_i ‖x_i − c_{label_i}‖² (within-cluster).
    Needs 2 ≤ K < N. W is floored at 1e-12 of the total scatter so that a perfect clustering
    gets a large finite score (fit statistics must stay JSON-serialisable) instead of ∞.
    """
    n = X.shape[0]
    if not 2 <= k < n:
        raise ValueError(f"calinski_harabasz: need 2 <= K < N, got K={k}, N={n}")
    X = X.double()
    counts = torch.bincount(labels, minlength=k).to(X.dtype)
    centers = cluster_sums(X, labels, k) / counts.clamp_min(1)[:, None]
    mean = X.mean(0)
    between = float((counts * (centers - mean).square().sum(1)).sum())
    within = float((X - centers[labels]).square().sum())
    total = float((X - mean).square().sum())
    within = max(within, 1e-12 * total)
    return (between / (k - 1)) / (within / (n - k))


def select_k(X: torch.Tensor, k_min: int, k_max: int, generator: torch.Generator, n_init: int = 4):
    """Cluster ``X`` [N, p] for every K in [k_min, k_max]; return (best result, {K: CH score}).

    The K with the highest Calinski–Harabasz index wins (the smallest K on ties). Needs
    2 ≤ k_min ≤ k_max < N and rows that are not all identical.
    """
    X = X.double()
    if float((X - X.mean(0)).square().sum()) <= 0.0:
        raise ValueError("select_k: all rows are identical; there is nothing to cluster")
    scores, best, best_score = {}, None, -math.inf
    for k in range(k_min, k_max + 1):
        res = kmeans(X, k, generator, n_init=n_init)
        scores[k] = calinski_harabasz(X, res.labels, k)
        if scores[k] > best_score:
            best, best_score = res, scores[k]
    return best, scores
