"""FineSteer: fine-grained inference-time steering of LLM hidden states with fused kernels.

SCS (a subspace gate) decides whether to steer a hidden state; MoSE (a mixture of steering
experts) decides how. See the README for a quickstart and ``docs/DESIGN.md`` for the design
(what "DESIGN §n" in the code refers to).
"""
from __future__ import annotations

__version__ = "0.1.0"

from ._backends import backends
from .artifact import ArtifactError, load_steerer, read_metadata
from .bank import SteeringBank
from .gate import CalibrationReport, SCSGate
from .mose import MoSE
from .ops import steer
from .steerer import Steerer

__all__ = [
    "__version__",
    "ArtifactError",
    "CalibrationReport",
    "FusedSteerer",
    "MoSE",
    "SCSGate",
    "Steerer",
    "SteeringBank",
    "backends",
    "fit_mose",
    "fit_scs",
    "load_steerer",
    "read_metadata",
    "recalibrate_scs",
    "steer",
]

# Heavier pieces are imported on first use: fitting pulls in the training loop, and the model
# integration pulls in transformers (an optional dependency).
_LAZY = {
    "fit_scs": "finesteer.fit",
    "fit_mose": "finesteer.fit",
    "recalibrate_scs": "finesteer.fit",
    "FusedSteerer": "finesteer.integrations.hf",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finesteer' has no attribute {name!r}")
