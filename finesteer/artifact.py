"""The steerer artifact: one ``.safetensors`` file with JSON metadata in its header (DESIGN §6).

Tensors: ``P, mu`` (gate; absent when the steerer has none), ``R, c, V, U, W1, b1, W2, b2``
(MoSE inference form), and the fit statistics ``prototypes`` and ``cluster_sizes`` when known.
The header's ``__metadata__`` holds one key, ``"finesteer"``, whose value is a JSON document:
``format_version``, ``method``, ``layer``, ``hidden_size``, ``model_name_or_path``,
``prompt_format`` (how prompts were formatted at fit time — ``"chat"``, ``"plain"`` or ``"raw"``,
see :mod:`finesteer.extract`; ``null`` when unknown — so generation and evaluation use the same),
``hyperparameters``, ``calibration``, ``fit`` (seed and MoSE statistics), ``package_version``.

Saving is atomic (temporary file in the same folder, then rename), and the same steerer always
serialises to the same bytes: no timestamps, sorted keys.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ._constants import FORMAT_VERSION, GATE_MODES
from .gate import CalibrationReport, SCSGate
from .mose import MoSE

METADATA_KEY = "finesteer"
GATE_TENSORS = ("P", "mu")
STAT_TENSORS = ("prototypes", "cluster_sizes")


class ArtifactError(ValueError):
    """A steerer file that cannot be used; the message names the file and the field."""

    def __init__(self, path, field: Optional[str], problem: str):
        where = f"{path}" + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}")
        self.path, self.field = str(path), field


def _package_version() -> str:
    from . import __version__
    return __version__


def save_steerer(steerer, path, model_name_or_path: Optional[str] = None) -> None:
    """Write ``steerer`` to ``path`` atomically; an existing file is replaced only when the new one is complete."""
    path = Path(path)
    mo, gate = steerer.mose, steerer.gate
    tensors = {name: getattr(mo, name) for name in MoSE.TENSORS}
    if gate is not None:
        tensors.update(P=gate.P, mu=gate.mu)
    if mo.prototypes is not None:
        tensors["prototypes"] = mo.prototypes
    if mo.cluster_sizes is not None:
        tensors["cluster_sizes"] = mo.cluster_sizes
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ArtifactError(path, name, "refusing to save a tensor with NaN or Inf values")

    meta = {
        "format_version": FORMAT_VERSION,
        "method": "finesteer",
        "layer": steerer.layer,
        "hidden_size": steerer.hidden_size,
        "model_name_or_path": model_name_or_path or steerer.metadata.get("model_name_or_path"),
        "prompt_format": steerer.metadata.get("prompt_format"),
        "hyperparameters": {
            "strength": steerer.strength,
            "gate_mode": steerer.gate_mode,
            "temperature": steerer.temperature,
            "scs_method": gate.method if gate is not None else None,
            "rank": gate.rank if gate is not None else 0,
            "num_experts": mo.num_experts,
            "residual_dim": mo.residual_dim,
            "mlp_hidden": mo.mlp_hidden,
        },
        "has_gate": gate is not None,
        "threshold": gate.threshold if gate is not None else None,
        "calibration": gate.report.to_dict() if (gate is not None and gate.report is not None) else None,
        "fit": mo.fit_stats,
        "extra": {k: v for k, v in steerer.metadata.items() if k not in ("model_name_or_path", "prompt_format")},
        "package_version": _package_version(),
    }
    header = {METADATA_KEY: json.dumps(meta, sort_keys=True, allow_nan=False)}
    save_safetensors_atomic(tensors, path, header)


def save_safetensors_atomic(tensors: dict, path, metadata: dict) -> None:
    """Write ``tensors`` to ``path`` through a temporary file in the same folder and a rename, so
    ``path`` is either its old file or the complete new one, and no temporary file is left behind."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; give the path of a file to write (e.g. "
                                f"{path / 'steerer.safetensors'})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        # mkstemp creates the file private (0600); the artifact is an ordinary file, so it gets the
        # permissions any new file gets here (0666 minus the umask, i.e. 0644 by default).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's file-creation mask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_metadata(path) -> dict:
    """The JSON metadata of an artifact, without loading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise ArtifactError(path, None, "is a directory, not a steerer file (a .safetensors file written by "
                            "Steerer.save or `finesteer fit`)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such steerer file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:
        raise ArtifactError(path, None, f"not a readable safetensors file (truncated or corrupt?): {exc}") from None
    if raw is None:
        raise ArtifactError(path, "__metadata__", f"no '{METADATA_KEY}' metadata: not a FineSteer artifact")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ArtifactError(path, "__metadata__", f"metadata is not valid JSON: {exc}") from None
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise ArtifactError(path, "format_version", f"missing or not an integer: {version!r}")
    if version > FORMAT_VERSION:
        raise ArtifactError(path, "format_version", f"version {version} is newer than this finesteer supports "
                            f"({FORMAT_VERSION}); upgrade finesteer")
    for key in ("layer", "hidden_size"):
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            raise ArtifactError(path, key, f"missing or not a non-negative integer: {meta.get(key)!r}")
    return meta


def load_steerer(path, hidden_size: Optional[int] = None, device=None):
    """Load and validate a steerer file.

    Checks: format version, every required tensor present, float dtype, consistent shapes
    (against the metadata's ``hidden_size`` and each other), finite values, and — when given —
    ``hidden_size`` of the model it will be used with. Raises :class:`ArtifactError` naming the
    file and the field.
    """
    from safetensors import safe_open

    from .steerer import Steerer

    path = Path(path)
    meta = read_metadata(path)
    d = meta["hidden_size"]
    if hidden_size is not None and hidden_size != d:
        raise ArtifactError(path, "hidden_size", f"artifact is for hidden size {d}, the model has {hidden_size}")
    has_gate = bool(meta.get("has_gate", True))
    required = MoSE.TENSORS + (GATE_TENSORS if has_gate else ())
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            for name in required + STAT_TENSORS:
                if name in names:
                    tensors[name] = f.get_tensor(name)
    except Exception as exc:
        raise ArtifactError(path, None, f"could not read tensors (truncated or corrupt?): {exc}") from None
    for name in required:
        if name not in tensors:
            raise ArtifactError(path, name, "required tensor is missing")
    for name, t in tensors.items():
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ArtifactError(path, name, f"dtype {t.dtype} is not a floating-point type")
        if not torch.isfinite(t).all():
            raise ArtifactError(path, name, "contains NaN or Inf")

    K = tensors["R"].shape[1] if tensors["R"].dim() == 2 else -1
    m = tensors["U"].shape[1] if tensors["U"].dim() == 2 else -1
    H = tensors["W1"].shape[0] if tensors["W1"].dim() == 2 else -1
    expected = {"R": (d, K), "c": (K,), "V": (K, d), "U": (d, m), "W1": (H, d), "b1": (H,),
                "W2": (m, H), "b2": (m,), "prototypes": (K, d), "cluster_sizes": (K,)}
    if has_gate:
        r = tensors["P"].shape[1] if tensors["P"].dim() == 2 else -1
        expected.update(P=(d, r), mu=(d,))
    for name, shape in expected.items():
        if name in tensors and (min(shape) < 1 or tuple(tensors[name].shape) != shape):
            raise ArtifactError(path, name, f"shape {tuple(tensors[name].shape)} does not match the expected "
                                f"{shape} (hidden_size={d})")

    hp = meta.get("hyperparameters", {})
    if not isinstance(hp, dict):
        raise ArtifactError(path, "hyperparameters", f"expected a JSON object, got {type(hp).__name__}")
    gate_mode = hp.get("gate_mode", "hard" if has_gate else "off")
    if gate_mode not in GATE_MODES:
        raise ArtifactError(path, "hyperparameters.gate_mode", f"unknown gate mode {gate_mode!r}")
    for key, default in (("strength", 1.0), ("temperature", 0.05)):
        value = hp.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ArtifactError(path, f"hyperparameters.{key}", f"not a finite number: {value!r}")
    if not hp.get("temperature", 0.05) > 0:
        raise ArtifactError(path, "hyperparameters.temperature", f"must be > 0, got {hp['temperature']!r}")
    to = (lambda t: t.float().to(device)) if device is not None else (lambda t: t.float())
    gate = None
    if has_gate:
        threshold = meta.get("threshold")
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ArtifactError(path, "threshold", f"missing or not a finite number: {threshold!r}")
        cal = meta.get("calibration")
        gate = SCSGate(P=to(tensors["P"]), mu=to(tensors["mu"]), threshold=float(threshold),
                       method=hp.get("scs_method") or "energy",
                       report=CalibrationReport(**cal) if cal else None)
    mose = MoSE(**{n: to(tensors[n]) for n in MoSE.TENSORS},
                prototypes=to(tensors["prototypes"]) if "prototypes" in tensors else None,
                cluster_sizes=to(tensors["cluster_sizes"]) if "cluster_sizes" in tensors else None,
                fit_stats=meta.get("fit") or {})
    extra = dict(meta.get("extra") or {})
    fmt = meta.get("prompt_format")
    if fmt is not None and fmt not in ("chat", "plain", "raw"):
        raise ArtifactError(path, "prompt_format", f"unknown prompt format {fmt!r} (expected 'chat', 'plain' or "
                            f"'raw')")
    for key in ("model_name_or_path", "prompt_format"):
        if meta.get(key):
            extra[key] = meta[key]
    return Steerer(gate=gate, mose=mose, strength=hp.get("strength", 1.0), layer=meta["layer"],
                   gate_mode=gate_mode, temperature=hp.get("temperature", 0.05), metadata=extra)
