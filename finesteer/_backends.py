"""Backend registry and selection.

Every backend is an object (a module, or an attribute of one) exposing ``NAME``,
``available() -> (bool, reason)``, ``supports(device) -> bool`` and the three operator entry
points of :mod:`finesteer.reference` (``steering_vectors``, ``add_vectors``, ``steer_tokens``)
with the same signatures and the same semantics, index/slot contract included. Each lives in
one module next to its op registration and fakes: ``finesteer.reference``,
``finesteer.fused.native`` (``cpu`` and ``cuda``: one compiled library, two devices) and
``finesteer.fused.triton``. Modules are imported lazily, so a backend whose toolchain is missing
costs nothing.

Selection (``backend="auto"``): the first available backend in :data:`AUTO_ORDER` that supports
the tensor's device. ``FINESTEER_BACKEND=<name>`` overrides ``auto``. As in Liger-Kernel's
registry, an auto-selected backend that cannot load is skipped silently, while an explicitly
requested one that cannot load raises with the reason.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

import torch

#: name → ``"module"`` or ``"module:attribute"`` implementing it.
BACKEND_MODULES = {
    "reference": "finesteer.reference",
    "cpu": "finesteer.fused.native:CPU",
    "triton": "finesteer.fused.triton",
    "cuda": "finesteer.fused.native:CUDA",
}

#: Preference order for ``backend="auto"``, per device type.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}

ENV_VAR = "FINESTEER_BACKEND"

_cache: dict[str, tuple[Any, str]] = {}


def _import(target: str) -> Any:
    module, _, attribute = target.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attribute) if attribute else mod


def _load(name: str) -> tuple[Any, str]:
    if name not in _cache:
        try:
            mod = _import(BACKEND_MODULES[name])
            ok, reason = mod.available()
            _cache[name] = (mod if ok else None, reason)
        except Exception as exc:  # a broken toolchain must not break the package
            _cache[name] = (None, f"import failed: {type(exc).__name__}: {exc}")
    return _cache[name]


def backends() -> dict[str, str]:
    """Every known backend with ``"available: <why>"`` or ``"unavailable: <why not>"``."""
    out = {}
    for name in BACKEND_MODULES:
        mod, reason = _load(name)
        out[name] = ("available: " if mod is not None else "unavailable: ") + reason
    return out


def get_backend(name: str, device: torch.device) -> Any:
    """Resolve ``name`` (a backend name or ``"auto"``) for tensors on ``device``."""
    device = torch.device(device)
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            mod, _ = _load(candidate)
            if mod is not None and mod.supports(device):
                return mod
        return _load("reference")[0]
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKEND_MODULES)} or 'auto'")
    mod, reason = _load(name)
    if mod is None:
        raise RuntimeError(f"backend {name!r} is unavailable: {reason}")
    if not mod.supports(device):
        raise RuntimeError(f"backend {name!r} does not support tensors on device {device}")
    return mod
