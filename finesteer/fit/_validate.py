"""Input checks shared by the fitting functions: every bad input gets a ``ValueError`` that names
the function, the argument and what is wrong with it."""
from __future__ import annotations

import numbers

import numpy as np
import torch


def as_matrix(x, name: str, where: str) -> torch.Tensor:
    """``x`` (tensor, NumPy array or nested sequence) as a finite fp64 CPU matrix [N, d].

    Fitting works in fp64 on the CPU whatever the input dtype or device: activations are
    usually stored in bf16/fp16, and the SVDs and statistics below lose digits in low precision.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{where}: {name} must be a tensor or array of numbers: {exc}") from None
    if t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or _is_integer(t.dtype)):
        raise ValueError(f"{where}: {name} must hold real numbers, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{where}: {name} must be 2-D [N, d], got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{where}: {name} is empty (shape {tuple(t.shape)}); need at least one row of at "
                         "least one feature")
    t = t.to("cpu", torch.float64).contiguous()
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        row, col = (~finite).nonzero()[0].tolist()
        raise ValueError(f"{where}: {name} contains NaN or Inf ({int((~finite).sum())} values; first at row "
                         f"{row}, column {col})")
    # Fitted tensors and the kernels are fp32: a value that overflows there is as bad as an Inf.
    big = t.abs() > torch.finfo(torch.float32).max
    if bool(big.any()):
        row, col = big.nonzero()[0].tolist()
        raise ValueError(f"{where}: {name} has values beyond the fp32 range (first at row {row}, column {col})")
    return t


def _is_integer(dtype: torch.dtype) -> bool:
    return dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_int(value, name: str, where: str, low: int, high: int | None = None) -> int:
    """``value`` as an ``int`` in [low, high] (``bool`` is not accepted as a number)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{where}: {name} must be {bound}, got {value}")
    return value


def check_real(value, name: str, where: str, low: float, high: float, low_open: bool = False,
               high_open: bool = False) -> float:
    """``value`` as a finite ``float`` in the interval given (open or closed at each end)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: {name} must be a real number, got {value!r}")
    value = float(value)
    ok = np.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{where}: {name} must be in {interval}, got {value}")
    return value


def check_choice(value, name: str, where: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{where}: unknown {name} {value!r}; choose one of {sorted(choices)}")
    return value


def holdout_split(n: int, fraction: float, generator: torch.Generator, name: str, where: str):
    """Seeded split of ``n`` rows into (fit, held-out) index tensors, both sorted.

    The held-out part has ``max(1, round(fraction·n))`` rows; both parts must be non-empty.
    """
    n_held = max(1, int(round(fraction * n)))
    if n - n_held < 1:
        raise ValueError(f"{where}: {name} has {n} rows, too few to split into a fit part and a held-out part "
                         f"(fraction {fraction} holds out {n_held}); need at least one row in each")
    perm = torch.randperm(n, generator=generator)
    return perm[n_held:].sort().values, perm[:n_held].sort().values


def child_generator(seed: int, stream: int) -> torch.Generator:
    """An independent, reproducible generator for one random step (split, init, shuffling, ...)
    of a fit, so that changing one step's consumption of random numbers leaves the others alone."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + stream) % (2 ** 63))
