"""A :class:`Steerer`: one fitted SCS gate + MoSE, bound to one layer, with its strength."""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch

from ._constants import GATE_MODES
from .gate import SCSGate, gate_from_score
from .mose import MoSE


def check_strength(value) -> float:
    """``value`` as a float, or a ``ValueError``/``TypeError`` saying why it cannot be a strength λ."""
    if isinstance(value, bool) or not isinstance(value, (Real, torch.Tensor)):
        raise TypeError(f"strength must be a real number, got {type(value).__name__} {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"strength must be a single number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"strength must be a finite number, got {value}")
    return value


class Steerer:
    """One steerer: *whether* to steer (``gate``) and *how* (``mose``), at decoder layer ``layer``.

    Semantics (one row ``h`` [d])::

        vector(h) = strength · g(h) · mose.vector(h)       # g from gate and gate_mode
        apply(h)  = h + vector(h)                          # rows with vector 0 stay bit-identical

    ``gate=None`` means "always steer" (gate mode ``off``). ``gate_mode`` defaults to ``"hard"``
    when there is a gate, ``"off"`` otherwise; ``temperature`` is used by the ``soft`` mode.
    ``strength`` (λ) must be a finite real number (0 disables steering, a negative value steers
    the other way); it is checked on construction and on every assignment, because a NaN or
    infinite λ would turn every steered row, even those with a closed gate, into NaN.
    """

    def __init__(self, gate: Optional[SCSGate] = None, mose: Optional[MoSE] = None, strength: float = 1.0,
                 layer: int = 0, gate_mode: Optional[str] = None, temperature: float = 0.05,
                 metadata: Optional[dict] = None):
        if mose is None:
            raise ValueError("Steerer needs a fitted MoSE (mose=...)")
        if gate_mode is None:
            gate_mode = "hard" if gate is not None else "off"
        if gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {sorted(GATE_MODES)}, got {gate_mode!r}")
        if gate is None and gate_mode != "off":
            raise ValueError(f"gate_mode={gate_mode!r} needs an SCS gate; pass gate=... or gate_mode='off'")
        if gate is not None and gate.hidden_size != mose.hidden_size:
            raise ValueError(f"gate hidden size {gate.hidden_size} != MoSE hidden size {mose.hidden_size}")
        if not (temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if int(layer) < 0:
            raise ValueError(f"layer must be >= 0, got {layer}")
        self.gate = gate
        self.mose = mose
        self.strength = strength
        self.layer = int(layer)
        self.gate_mode = gate_mode
        self.temperature = float(temperature)
        self.metadata = dict(metadata or {})

    @property
    def strength(self) -> float:
        """Steering strength λ (a finite float)."""
        return self._strength

    @strength.setter
    def strength(self, value) -> None:
        self._strength = check_strength(value)

    @property
    def hidden_size(self) -> int:
        return self.mose.hidden_size

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """SCS score of every row of ``h`` [..., d] → fp32 [...] (ones when there is no gate)."""
        if self.gate is None:
            return torch.ones(h.shape[:-1], dtype=torch.float32, device=h.device)
        return self.gate.score(h)

    def gate_value(self, h: torch.Tensor) -> torch.Tensor:
        """Gate g(h) ∈ [0, 1] for every row of ``h`` [..., d] → fp32 [...]."""
        if self.gate is None:
            return torch.ones(h.shape[:-1], dtype=torch.float32, device=h.device)
        return gate_from_score(self.gate.score(h), self.gate.threshold, self.gate_mode, self.temperature)

    def vector(self, h: torch.Tensor) -> torch.Tensor:
        """Scaled steering vector λ·g(h)·s(h) for every row of ``h`` [..., d] → fp32 [..., d]."""
        return (self.strength * self.gate_value(h)).unsqueeze(-1) * self.mose.vector(h)

    def bank(self, device=None, weight_dtype: torch.dtype = torch.float32):
        """This steerer packed as a one-entry :class:`~finesteer.bank.SteeringBank`."""
        from .bank import SteeringBank
        return SteeringBank.from_steerers([self], device=device, weight_dtype=weight_dtype)

    def apply(self, h: torch.Tensor, mode: str = "token", backend: str = "reference", **kwargs) -> torch.Tensor:
        """Steer ``h`` (see :func:`finesteer.steer` for ``mode`` and the shapes)."""
        from .ops import steer
        return steer(h, self, mode=mode, backend=backend, **kwargs)

    def save(self, path, model_name_or_path: Optional[str] = None) -> None:
        """Write this steerer to one ``.safetensors`` file, atomically (DESIGN §6)."""
        from .artifact import save_steerer
        save_steerer(self, path, model_name_or_path=model_name_or_path)

    @classmethod
    def load(cls, path, hidden_size: Optional[int] = None, device=None) -> "Steerer":
        """Read a steerer written by :meth:`save`, validating it (see :func:`finesteer.artifact.load_steerer`)."""
        from .artifact import load_steerer
        return load_steerer(path, hidden_size=hidden_size, device=device)

    def __repr__(self) -> str:
        gate = f"SCS(rank={self.gate.rank}, tau={self.gate.threshold:.4g})" if self.gate is not None else "None"
        mo = self.mose
        return (f"Steerer(layer={self.layer}, d={self.hidden_size}, gate={gate}, gate_mode={self.gate_mode!r}, "
                f"K={mo.num_experts}, m={mo.residual_dim}, H={mo.mlp_hidden}, strength={self.strength})")
