"""Guarded loading of the compiled operators in ``csrc/`` (the ``cpu`` and ``cuda`` backends).

The C++ code registers three dispatcher ops under ``torch.ops.finesteer_ext`` (schemas in
``csrc/ops.cpp``): ``steering_vectors``, ``steer_tokens`` and ``add_vectors``; their fake
kernels and the backends that call them are in :mod:`finesteer.fused.native`. They are found, in
order, in

1. ``finesteer._C``: built at install time by ``setup.py`` (when torch and a compiler were
   present in the build environment; with CUDA torch and nvcc it also holds the CUDA kernels);
2. a build at first use from the ``csrc/`` sources of a source checkout (editable install) or
   the copy of them that a wheel carries (``finesteer/_csrc``), in the keyed build cache of
   :mod:`finesteer._build`: one directory per (source bytes, flags, torch, Python) combination,
   so later processes, other checkouts and other virtual environments with the same sources and
   torch only load the cached library. The build (~2 min on 2 cores) says so
   with one line on stderr when it starts; cache hits are silent. It needs a C++ compiler and
   ``ninja`` (a dependency of the package).

Every outcome is recorded with a human-readable reason (``finesteer.backends()`` shows it) and
is final for the process: a failed build is never retried in the same process. Nothing here
raises; the backends report ``(False, reason)`` and the dispatcher falls back to the reference.

Environment: ``FINESTEER_DISABLE_EXT=1`` skips both (the reference serves everything);
``FINESTEER_BUILD_DIR`` sets the build cache's root (see :func:`finesteer._build.cache_root`);
``FINESTEER_VERBOSE_BUILD=1`` shows compiler output.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from . import _build

NAMESPACE = "finesteer_ext"
OPS = ("steering_vectors", "steer_tokens", "add_vectors")

#: The sources a first-use build compiles: the checkout's csrc/, else the wheel's copy.
CSRC = _build.csrc_dir()
#: Whether they are a checkout's, which can be edited after finesteer._C was built from them.
CSRC_IS_CHECKOUT = CSRC == _build.checkout_csrc_dir()

_lock = threading.Lock()
_state: dict[str, tuple[bool, str]] = {}


def _has_kernel(op: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key))
    except Exception:  # op not defined at all
        return False


def _short(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " | ")
    return text if len(text) <= limit else text[:limit] + " ..."


def _prebuilt_is_stale(origin: str) -> bool:
    """True when csrc/ (a source checkout) has sources newer than the installed finesteer._C."""
    try:
        built = os.path.getmtime(origin)
        return any(p.stat().st_mtime > built for p in CSRC.rglob("*") if p.suffix in (".cpp", ".cu", ".cuh", ".h"))
    except OSError:
        return False


def _try_prebuilt() -> str:
    """Import finesteer._C if it was built at install time; returns a note for the reason."""
    try:
        spec = importlib.util.find_spec("finesteer._C")
        if spec is None:
            return "no prebuilt finesteer._C"
        if spec.origin and CSRC_IS_CHECKOUT and CSRC.is_dir() and _prebuilt_is_stale(spec.origin):
            # Importing would register the old kernels for good; build the current sources instead.
            return f"prebuilt finesteer._C at {spec.origin} is older than csrc/ (skipped)"
        importlib.import_module("finesteer._C")
        return "prebuilt finesteer._C"
    except ImportError as exc:
        return f"no prebuilt finesteer._C ({exc})"
    except Exception as exc:  # a stale or broken binary (e.g. built for another torch)
        return f"prebuilt finesteer._C failed to load ({_short(exc, 200)})"


def _jit_build(kind: str) -> tuple[bool, str]:
    """Load the ``kind`` library from the keyed build cache, building it there first if needed."""
    label = "CPU kernel" if kind == "cpu" else "CUDA kernels"
    extra = None
    if kind == "cuda":  # torch's builder also compiles for the visible device's architecture
        extra = {"device_capability": "%d.%d" % torch.cuda.get_device_capability()}
    try:
        entry = _build.cache_entry(kind, torch.__version__, cuda_version=torch.version.cuda, csrc=CSRC, extra=extra)
    except FileNotFoundError as exc:
        return False, f"C++ sources incomplete ({exc}); reinstall with a compiler"
    if entry.is_complete():  # cache hit: no compiler, no ninja, no lock needed
        try:
            torch.ops.load_library(str(entry.library))
        except Exception as exc:
            return False, (f"cached {label} at {entry.library} failed to load ({_short(exc)}); "
                           f"delete {entry.dir} to rebuild it")
        return True, f"{label} from the build cache ({entry.dir})"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return False, f"no C++ compiler ({cxx!r} not on PATH); install one (e.g. g++) or set CXX"
    try:
        from torch.utils import cpp_extension
    except Exception as exc:
        return False, f"torch.utils.cpp_extension unavailable: {_short(exc)}"
    if not cpp_extension.is_ninja_available():
        return False, "ninja is not installed (pip install ninja); needed to build the kernels at first use"
    try:
        _build.jit_build(entry, CSRC, verbose=os.environ.get("FINESTEER_VERBOSE_BUILD") == "1")
    except Exception as exc:
        return False, f"build of the {label} failed: {_short(exc)} (set FINESTEER_VERBOSE_BUILD=1 for the log)"
    return True, f"{label} built from csrc/ at first use (cached in {entry.dir})"


def load_cpu() -> tuple[bool, str]:
    """Make the CPU kernels available; ``(ok, reason)``. Idempotent, attempted once per process."""
    with _lock:
        if "cpu" not in _state:
            _state["cpu"] = _load_cpu_locked()
        return _state["cpu"]


def _load_cpu_locked() -> tuple[bool, str]:
    if os.environ.get("FINESTEER_DISABLE_EXT") == "1":
        return False, "disabled by FINESTEER_DISABLE_EXT=1"
    if all(_has_kernel(op, "CPU") for op in OPS):
        return True, "already loaded"
    note = _try_prebuilt()
    if all(_has_kernel(op, "CPU") for op in OPS):
        return True, note
    ok, reason = _jit_build("cpu")
    if ok and not all(_has_kernel(op, "CPU") for op in OPS):
        ok, reason = False, f"{reason}, but the ops did not register (stale build cache?)"
    return ok, reason if ok else f"{reason}; {note}"


def load_cuda() -> tuple[bool, str]:
    """Make the CUDA kernels available; ``(ok, reason)``. Idempotent, attempted once per process."""
    with _lock:
        if "cuda" not in _state:
            _state["cuda"] = _load_cuda_locked()
        return _state["cuda"]


def _load_cuda_locked() -> tuple[bool, str]:
    if os.environ.get("FINESTEER_DISABLE_EXT") == "1":
        return False, "disabled by FINESTEER_DISABLE_EXT=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    if "cpu" not in _state:  # the CUDA library only adds kernels to the schemas defined with the CPU ones
        _state["cpu"] = _load_cpu_locked()
    cpu_ok, cpu_reason = _state["cpu"]
    if all(_has_kernel(op, "CUDA") for op in OPS):
        return True, "CUDA kernels in the prebuilt finesteer._C" if "prebuilt" in cpu_reason else "already loaded"
    if not cpu_ok:
        return False, f"the op schemas come with the CPU library, which is unavailable: {cpu_reason}"
    try:
        from torch.utils import cpp_extension
        cuda_home = cpp_extension.CUDA_HOME
    except Exception as exc:
        return False, f"torch.utils.cpp_extension unavailable: {_short(exc)}"
    if not cuda_home or shutil.which("nvcc") is None and not Path(cuda_home, "bin", "nvcc").exists():
        return False, "nvcc not found (set CUDA_HOME); needed to build the CUDA kernels at first use"
    ok, reason = _jit_build("cuda")
    if ok and not all(_has_kernel(op, "CUDA") for op in OPS):
        ok, reason = False, f"{reason}, but the CUDA kernels did not register"
    return ok, reason


def status() -> dict[str, str]:
    """What has been attempted so far and why (does not trigger a build)."""
    return {k: ("available: " if ok else "unavailable: ") + why for k, (ok, why) in _state.items()}


if __name__ == "__main__":  # python -m finesteer._ext: build/load and report
    print("cpu :", load_cpu())
    print("cuda:", load_cuda())
    sys.exit(0)
