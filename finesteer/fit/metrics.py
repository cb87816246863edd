"""Calibration metrics for the SCS gate: AUROC by rank statistic and the FPR-bounded threshold."""
from __future__ import annotations

import math

import torch


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Area under the ROC curve of scores ``pos`` [n_p] (positives) vs ``neg`` [n_n] (negatives).

    Semantics: P(score_pos > score_neg) + ½·P(score_pos == score_neg), computed exactly by the
    Mann–Whitney rank statistic with mid-ranks for ties; no O(n_p·n_n) pairwise matrix.
    """
    n_p, n_n = pos.numel(), neg.numel()
    if n_p == 0 or n_n == 0:
        raise ValueError(f"auroc: need at least one positive and one negative score (got {n_p}, {n_n})")
    scores = torch.cat([pos.reshape(-1), neg.reshape(-1)]).double()
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()              # 1-based rank of the last member of each tie group
    mid_rank = ends - (counts.double() - 1) / 2   # average rank inside the group
    rank_sum = mid_rank[inverse[:n_p]].sum().item()
    return (rank_sum - n_p * (n_p + 1) / 2) / (n_p * n_n)


def threshold_at_fpr(neg: torch.Tensor, max_fpr: float) -> float:
    """The smallest τ with FPR(τ) = mean(neg > τ) ≤ ``max_fpr`` (hard gate 1[s > τ]).

    FPR(τ) never increases with τ and TPR(τ) never increases either, so the smallest τ that
    meets the bound is the one with the highest TPR — the "largest allowed false-positive rate"
    operating point. With ``k = ⌊max_fpr·n⌋`` allowed false positives it is the (n−k)-th smallest
    negative score: the k scores above it pass, the ones equal to it do not. Requires
    0 ≤ max_fpr < 1 (at 1 no finite τ is the smallest).
    """
    n = neg.numel()
    s = neg.reshape(-1).sort().values
    # The small slack forgives decimal fractions such as 0.29·100 = 28.999…; the loop then
    # guarantees the bound in floating point exactly as the report computes it (count / n).
    k = min(n - 1, math.floor(max_fpr * n + 1e-9))
    while k > 0 and k / n > max_fpr:
        k -= 1
    return float(s[n - 1 - k])
