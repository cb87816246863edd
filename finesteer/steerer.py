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

    @property
    def reads_response_tokens(self) -> bool:
        """Whether the gate was fitted on response tokens (``finesteer fit --gate-tokens response``,
        recorded in the metadata as ``gate_tokens``): such a gate belongs in token mode, which reads
        every generated token, not in prompt mode, which reads the last prompt token only."""
        return self.metadata.get("gate_tokens") == "response"

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
        """Scaled steering vector λ·g(h)·s(h) for every row of ``h`` [..., d] → fp32 [..., d].

        Computed from the unpacked gate and MoSE; ``tests/test_steerer.py`` checks it equals
        :func:`finesteer.reference.steering_vectors` on this steerer's bank."""
        return (self.strength * self.gate_value(h)).unsqueeze(-1) * self.mose.vector(h)

    def bank(self, device=None, weight_dtype: torch.dtype = torch.float32):
        """This steerer packed as a new one-entry :class:`~finesteer.bank.SteeringBank` (yours to edit)."""
        from .bank import SteeringBank
        return SteeringBank.from_steerers([self], device=device, weight_dtype=weight_dtype)

    def packed_bank(self, device=None, weight_dtype: torch.dtype = torch.float32):
        """This steerer packed as a one-entry bank, cached per ``(device, weight_dtype)``.

        :func:`finesteer.steer` and :meth:`apply` use it so that a call does not re-pack the
        weights (packing costs ~2 ms at d = 2048, twenty times the fused op). The cached bank is
        rebuilt on the next call after any of these changes: ``strength``, ``gate_mode``,
        ``temperature``, the gate's ``threshold``, replacing ``gate``/``mose`` or one of their
        tensors, or an in-place edit of one of those tensors (seen through the tensor's version
        counter). The bank is shared by every call: treat it as read-only (use :meth:`bank` for
        a private copy to edit).
        """
        key = (torch.device("cpu" if device is None else device), weight_dtype)
        objects, stamp = self._pack_stamp()
        cache = self.__dict__.setdefault("_packed", {})
        hit = cache.get(key)
        if hit is not None and hit[1] == stamp:
            return hit[2]
        bank = self.bank(device=key[0], weight_dtype=weight_dtype)
        # The entry keeps `objects` alive, so none of their ids in `stamp` can be reused by a new
        # object while the entry exists (an id match then really means the same object).
        cache[key] = (objects, stamp, bank)
        return bank

    def _pack_stamp(self) -> tuple:
        """``(objects, stamp)``: what the packed bank depends on. ``stamp`` is a flat tuple of plain
        numbers and strings (compared in one C-level ``==``): the scalars, the ids of the gate, the
        MoSE and their tensors, and each tensor's version counter (bumped by in-place edits).
        Written out rather than looped: it runs on every public call (~1 µs)."""
        gate, mo = self.gate, self.mose
        R, c, V, U, W1, b1, W2, b2 = mo.R, mo.c, mo.V, mo.U, mo.W1, mo.b1, mo.W2, mo.b2
        stamp = (self.strength, self.gate_mode, self.temperature, id(mo),
                 id(R), R._version, id(c), c._version, id(V), V._version, id(U), U._version,
                 id(W1), W1._version, id(b1), b1._version, id(W2), W2._version, id(b2), b2._version)
        tensors = (R, c, V, U, W1, b1, W2, b2)
        if gate is not None:
            P, mu = gate.P, gate.mu
            stamp += (float(gate.threshold), id(gate), id(P), P._version, id(mu), mu._version)
            tensors += (P, mu)
        return (gate, mo, tensors), stamp

    def invalidate_packed(self) -> None:
        """Drop the cached packed banks (not needed after the changes :meth:`packed_bank` tracks)."""
        self.__dict__.pop("_packed", None)

    def apply(self, h: torch.Tensor, mode: str = "token", backend: str = "auto", **kwargs) -> torch.Tensor:
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

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_packed", None)  # a cache, not part of the steerer (pickling, deepcopy)
        return state

    def __repr__(self) -> str:
        gate = f"SCS(rank={self.gate.rank}, tau={self.gate.threshold:.4g})" if self.gate is not None else "None"
        mo = self.mose
        return (f"Steerer(layer={self.layer}, d={self.hidden_size}, gate={gate}, gate_mode={self.gate_mode!r}, "
                f"K={mo.num_experts}, m={mo.residual_dim}, H={mo.mlp_hidden}, strength={self.strength})")

