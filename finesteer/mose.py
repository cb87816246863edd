"""MoSE: the mixture of steering experts that decides *how* to steer (DESIGN §3).

This module holds the exported inference form. The trainable network and the fit live in
:mod:`finesteer.fit.mose`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .gate import _check_hidden


@dataclass(eq=False)
class MoSE:
    """A fitted MoSE in inference form (routing collapsed at export, DESIGN §3).

    Semantics::

        α(h) = softmax(hᵀR + c)                       # [K] expert weights
        β(h) = W2 relu(W1 h + b1) + b2                # [m] residual coefficients
        s(h) = α(h) V + U β(h)                        # [d] unscaled steering vector

    Shapes (all fp32): ``R`` [d, K], ``c`` [K], ``V`` [K, d], ``U`` [d, m], ``W1`` [H, d],
    ``b1`` [H], ``W2`` [m, H], ``b2`` [m]. ``prototypes`` [K, d] and ``cluster_sizes`` [K] are
    fit statistics (``V`` equals ``prototypes`` unless learned values were fitted).
    ``fit_stats`` is JSON-serialisable (chosen K, CH scores, losses, epochs);
    ``history`` (per-epoch losses) is kept in memory only.
    """

    R: torch.Tensor
    c: torch.Tensor
    V: torch.Tensor
    U: torch.Tensor
    W1: torch.Tensor
    b1: torch.Tensor
    W2: torch.Tensor
    b2: torch.Tensor
    prototypes: Optional[torch.Tensor] = None
    cluster_sizes: Optional[torch.Tensor] = None
    fit_stats: dict = field(default_factory=dict)
    history: Optional[dict] = None

    TENSORS = ("R", "c", "V", "U", "W1", "b1", "W2", "b2")

    @property
    def hidden_size(self) -> int:
        return self.R.shape[0]

    @property
    def num_experts(self) -> int:
        return self.R.shape[1]

    @property
    def residual_dim(self) -> int:
        return self.U.shape[1]

    @property
    def mlp_hidden(self) -> int:
        return self.W1.shape[0]

    def __repr__(self) -> str:
        # Short on purpose: the dataclass default would print every tensor and the training history.
        parts = [f"d={self.hidden_size}", f"K={self.num_experts}", f"m={self.residual_dim}", f"H={self.mlp_hidden}"]
        if self.cluster_sizes is not None:
            parts.append(f"cluster_sizes={[int(x) for x in self.cluster_sizes.tolist()]}")
        stats = self.fit_stats or {}
        for key in ("best_epoch", "val_loss"):
            if isinstance(stats.get(key), (int, float)):
                parts.append(f"{key}={stats[key]:.4g}" if isinstance(stats[key], float) else f"{key}={stats[key]}")
        return f"MoSE({', '.join(parts)})"

    def routing(self, h: torch.Tensor) -> torch.Tensor:
        """Expert weights α(h) for every row of ``h`` [..., d] → fp32 [..., K]."""
        _check_hidden(h, self.hidden_size, "MoSE.routing")
        return torch.softmax(h.float() @ self.R.to(h.device) + self.c.to(h.device), dim=-1)

    def coefficients(self, h: torch.Tensor) -> torch.Tensor:
        """Residual coefficients β(h) for every row of ``h`` [..., d] → fp32 [..., m]."""
        _check_hidden(h, self.hidden_size, "MoSE.coefficients")
        dev = h.device
        hidden = torch.relu(h.float() @ self.W1.to(dev).T + self.b1.to(dev))
        return hidden @ self.W2.to(dev).T + self.b2.to(dev)

    def vector(self, h: torch.Tensor) -> torch.Tensor:
        """The unscaled steering vector s(h) for every row of ``h`` [..., d] → fp32 [..., d]."""
        dev = h.device
        return self.routing(h) @ self.V.to(dev) + self.coefficients(h) @ self.U.to(dev).T
