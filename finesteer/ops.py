"""The public functional :func:`steer` and the three operator entry points, dispatched to a backend."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._backends import get_backend
from ._constants import FLOAT_DTYPES, INDEX_DTYPES
from .bank import SteeringBank


def as_bank(steerer_or_bank, device) -> SteeringBank:
    """A :class:`SteeringBank` on ``device`` from a bank, a :class:`~finesteer.Steerer` or a list of them."""
    from .steerer import Steerer

    if isinstance(steerer_or_bank, SteeringBank):
        if steerer_or_bank.device != torch.device(device) and not (
                steerer_or_bank.device.type == torch.device(device).type == "cpu"):
            raise ValueError(f"steering bank is on {steerer_or_bank.device}, the hidden states on {device}; "
                             f"move it with bank.to(device)")
        return steerer_or_bank
    if isinstance(steerer_or_bank, Steerer):
        return steerer_or_bank.packed_bank(device)  # cached on the steerer: no re-pack per call
    if isinstance(steerer_or_bank, (list, tuple)) and all(isinstance(s, Steerer) for s in steerer_or_bank):
        return SteeringBank.from_steerers(steerer_or_bank, device=device)
    raise TypeError(f"expected a Steerer, a list of Steerers or a SteeringBank, got {type(steerer_or_bank).__name__}")


def check_hidden(h: torch.Tensor, bank: SteeringBank, where: str = "steer") -> None:
    if not isinstance(h, torch.Tensor) or h.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: hidden states must be a float32/bfloat16/float16 tensor, "
                        f"got {getattr(h, 'dtype', type(h).__name__)}")
    if h.dim() < 1 or h.shape[-1] != bank.hidden_size:
        raise ValueError(f"{where}: hidden size mismatch: hidden states have shape {tuple(h.shape)}, "
                         f"the steerer was fitted for hidden size {bank.hidden_size}")


def check_index(index: torch.Tensor, shape, bank: SteeringBank, device, where: str, check_range: bool) -> torch.Tensor:
    """Validate a bank-index tensor; with ``check_range`` also its values (a host sync on GPU)."""
    if not isinstance(index, torch.Tensor):
        index = torch.as_tensor(index, device=device)
    if index.dtype not in INDEX_DTYPES:
        raise TypeError(f"{where}: index must be an int32/int64 tensor, got {index.dtype}")
    if tuple(index.shape) != tuple(shape):
        raise ValueError(f"{where}: index has shape {tuple(index.shape)}, expected {tuple(shape)}")
    if index.device != torch.device(device) and not (index.device.type == torch.device(device).type == "cpu"):
        raise ValueError(f"{where}: index is on {index.device}, the hidden states on {device}")
    if check_range and index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < -1 or hi >= bank.num_steerers:
            raise IndexError(f"{where}: index values must be in [-1, {bank.num_steerers - 1}] "
                             f"(bank of {bank.num_steerers}), got range [{lo}, {hi}]")
    return index


def steering_vectors(h: torch.Tensor, bank: SteeringBank, index: Optional[torch.Tensor] = None,
                     backend: str = "auto") -> torch.Tensor:
    """λ·g(h)·s(h) per row. ``h`` [T, d], ``index`` [T] or None → fp32 [T, d]. No validation, no sync."""
    return get_backend(backend, h.device).steering_vectors(h, bank, index)


def add_vectors(h: torch.Tensor, vectors: torch.Tensor, slot: Optional[torch.Tensor] = None,
                backend: str = "auto") -> torch.Tensor:
    """``h[t] + vectors[slot[t]]`` (−1: unchanged). ``h`` [T, d], ``vectors`` [S, d] fp32, ``slot`` [T]."""
    return get_backend(backend, h.device).add_vectors(h, vectors, slot)


def sequence_slots(owner: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The prompt-mode slot map: row ``b·S + t`` of a flattened ``[B, S]`` batch reads vector
    ``owner[b]`` (−1 = none) → int32 ``[B·S]``. ``owner`` [B] integer, on the rows' device.

    Every prompt-mode caller (:func:`steer`, :class:`~finesteer.FusedSteerer`, the evaluation's
    scoring hook) builds its :func:`add_vectors` slots with this; no host sync.
    """
    return owner.to(torch.int32).repeat_interleave(seq_len)


def steer_tokens(h: torch.Tensor, bank: SteeringBank, index: Optional[torch.Tensor] = None,
                 backend: str = "auto") -> torch.Tensor:
    """Token mode on ``h`` [T, d] with ``index`` [T] or None. No validation, no sync."""
    return get_backend(backend, h.device).steer_tokens(h, bank, index)


def steer(h: torch.Tensor, steerer_or_bank: Union["SteeringBank", Sequence, object], mode: str = "token",
          index: Optional[torch.Tensor] = None, backend: str = "auto",
          last_index: Optional[torch.Tensor] = None, check_index_range: bool = True) -> torch.Tensor:
    """Steer hidden states with one steerer or a bank of them (DESIGN §4).

    Semantics::

        token:  out[..., t, :] = h[..., t, :] + λ·g(h_t)·s(h_t)      # each row its own gate and vector
        prompt: v_b = λ·g(h[b, last_b])·s(h[b, last_b])             # once per sequence
                out[b, t, :] = h[b, t, :] + v_b                      # at every position t

    Elements whose steering vector component is exactly zero (closed hard gate, index −1) are
    returned bit-identical to ``h``; the rest are computed in fp32 and rounded once.

    Shapes:
        h:          [..., d] in token mode; [S, d] (one sequence) or [B, S, d] in prompt mode.
        index:      bank index per row (``h.shape[:-1]``) or per sequence ([B] for 3-D ``h``);
                    −1 = leave unsteered; ``None`` = every row uses steerer 0.
        last_index: prompt mode only, [B] position of each sequence's last prompt token
                    (default: the last position, ``S − 1``).
    Returns a new tensor shaped and typed like ``h``; ``h`` is not modified.

    ``backend``: a name from :func:`finesteer.backends` or ``"auto"`` (the default, as everywhere:
    the best available backend for ``h``'s device, ``FINESTEER_BACKEND`` overrides it).

    ``check_index_range`` (default ``True``) raises ``IndexError`` for an index outside
    ``[−1, N)`` before dispatch (a host–device sync on GPU). With ``False`` such values are not
    errors: as on every backend, they leave their rows unsteered (:mod:`finesteer.reference`).
    """
    if mode not in ("token", "prompt"):
        raise ValueError(f"mode must be 'token' or 'prompt', got {mode!r}")
    bank = as_bank(steerer_or_bank, h.device if isinstance(h, torch.Tensor) else "cpu")
    check_hidden(h, bank)
    d = h.shape[-1]

    if mode == "token":
        lead = h.shape[:-1]
        if index is not None:
            index = torch.as_tensor(index, device=h.device) if not isinstance(index, torch.Tensor) else index
            if h.dim() == 3 and tuple(index.shape) == (h.shape[0],):
                index = index[:, None].expand(lead)
            index = check_index(index, lead, bank, h.device, "steer", check_index_range).reshape(-1)
        out = steer_tokens(h.reshape(-1, d), bank, index, backend)
        return out.reshape(h.shape)

    if h.dim() not in (2, 3):
        raise ValueError(f"steer(mode='prompt'): hidden states must be [S, d] or [B, S, d], got {tuple(h.shape)}")
    h3 = h.unsqueeze(0) if h.dim() == 2 else h
    B, S, _ = h3.shape
    if S == 0:
        raise ValueError("steer(mode='prompt'): sequences are empty (S = 0)")
    if last_index is None:
        last_index = torch.full((B,), S - 1, dtype=torch.long, device=h.device)
    else:
        last_index = check_index(last_index, (B,), bank, h.device, "steer(last_index)", False).long()
        if check_index_range and B and (int(last_index.min()) < 0 or int(last_index.max()) >= S):
            raise IndexError(f"steer(mode='prompt'): last_index values must be in [0, {S - 1}]")
    if index is not None:
        index = check_index(index, (B,), bank, h.device, "steer", check_index_range)
    last_rows = h3[torch.arange(B, device=h.device), last_index]
    vectors = steering_vectors(last_rows, bank, index, backend)
    slot = sequence_slots(torch.arange(B, device=h.device), S)
    out = add_vectors(h3.reshape(-1, d), vectors, slot, backend)
    return out.reshape(h.shape)
