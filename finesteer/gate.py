"""SCS: the subspace-guided gate that decides *whether* to steer (DESIGN §2).

This module holds the inference-time form of a fitted gate. Fitting lives in
:mod:`finesteer.fit.scs`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ._constants import GATE_EPS, GATE_MODES


@dataclass
class CalibrationReport:
    """How the threshold τ was chosen, measured on the held-out calibration split.

    ``tpr``/``fpr`` are the fractions of held-out target/benign rows with score > τ;
    ``auroc`` is the area under the ROC curve of the score on that split.
    """

    threshold: float
    tpr: float
    fpr: float
    auroc: float
    n_target: int
    n_benign: int
    max_benign_fpr: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:  # printed by the CLI
        return (
            f"tau={self.threshold:.4g}  TPR={self.tpr:.3f}  FPR={self.fpr:.3f}  "
            f"AUROC={self.auroc:.3f}  (held-out: {self.n_target} target, {self.n_benign} benign; "
            f"max benign FPR {self.max_benign_fpr})"
        )


@dataclass(eq=False)
class SCSGate:
    """A fitted SCS gate.

    Semantics::

        s(h) = ‖Pᵀ(h − μ)‖² / (‖h − μ‖² + ε)          # in [0, 1]
        hard: g = 1[s > τ]   soft: g = sigmoid((s − τ) / temperature)   off: g = 1

    Shapes: ``P`` [d, r] with orthonormal columns, ``mu`` [d]; both fp32.
    """

    P: torch.Tensor
    mu: torch.Tensor
    threshold: float
    method: str = "energy"
    report: Optional[CalibrationReport] = None

    @property
    def hidden_size(self) -> int:
        return self.P.shape[0]

    @property
    def rank(self) -> int:
        return self.P.shape[1]

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """SCS score of every row of ``h`` [..., d] → fp32 [...]."""
        _check_hidden(h, self.hidden_size, "SCSGate.score")
        hc = h.float() - self.mu.to(h.device)
        proj = hc @ self.P.to(h.device)
        return proj.square().sum(-1) / (hc.square().sum(-1) + GATE_EPS)

    def gate(self, h: torch.Tensor, mode: str = "hard", temperature: float = 0.05) -> torch.Tensor:
        """Gate value g(h) ∈ [0, 1] for every row of ``h`` [..., d] → fp32 [...]."""
        return gate_from_score(self.score(h), self.threshold, mode, temperature)


def gate_from_score(score: torch.Tensor, threshold, mode: str, temperature) -> torch.Tensor:
    """Map SCS scores to gate values (``threshold``/``temperature`` may be tensors that broadcast)."""
    if mode not in GATE_MODES:
        raise ValueError(f"gate_mode must be one of {sorted(GATE_MODES)}, got {mode!r}")
    if mode == "off":
        return torch.ones_like(score)
    if mode == "hard":
        return (score > threshold).to(score.dtype)
    return torch.sigmoid((score - threshold) / temperature)


def _check_hidden(h: torch.Tensor, d: int, where: str) -> None:
    if h.shape[-1] != d:
        raise ValueError(f"{where}: hidden size mismatch: input has {h.shape[-1]} features, fitted for {d}")
