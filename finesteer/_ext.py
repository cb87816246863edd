"""Guarded loading of the compiled operators in ``csrc/`` (the ``cpu`` and ``cuda`` backends).

The C++ code registers three dispatcher ops under ``torch.ops.finesteer_ext`` (schemas in
``csrc/ops.cpp``): ``steering_vectors``, ``steer_tokens`` and ``add_vectors``; their fake
kernels and the backends that call them are in :mod:`finesteer.fused.native`. They are found, in
order, in

1. ``finesteer._C``: built at install time by ``setup.py`` (when torch and a compiler were
   present in the build environment; with CUDA torch and nvcc it also holds the CUDA kernels);
2. a build at first use with ``torch.utils.cpp_extension.load`` from the ``csrc/`` sources of a
   source checkout (editable install), cached in ``$FINESTEER_BUILD_DIR`` or torch's default
   extensions directory, so later processes only load the cached library.

Every outcome is recorded with a human-readable reason (``finesteer.backends()`` shows it) and
is final for the process: a failed build is never retried in the same process. Nothing here
raises; the backends report ``(False, reason)`` and the dispatcher falls back to the reference.

Environment: ``FINESTEER_DISABLE_EXT=1`` skips both (the reference serves everything);
``FINESTEER_BUILD_DIR`` sets the build cache; ``FINESTEER_VERBOSE_BUILD=1`` shows compiler output.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch

NAMESPACE = "finesteer_ext"
OPS = ("steering_vectors", "steer_tokens", "add_vectors")

#: Source checkout's csrc/ (absent in a wheel install; then only finesteer._C can provide the ops).
CSRC = Path(__file__).resolve().parent.parent / "csrc"
CPU_SOURCES = ("ops.cpp", "cpu/steer_cpu.cpp")
CUDA_SOURCES = ("cuda/steer_cuda_binding.cpp", "cuda/steer_cuda.cu")

_lock = threading.Lock()
_state: dict[str, tuple[bool, str]] = {}


def _has_kernel(op: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key))
    except Exception:  # op not defined at all
        return False


def _build_dir(name: str) -> str | None:
    root = os.environ.get("FINESTEER_BUILD_DIR")
    if not root:
        return None  # torch's default (~/.cache/torch_extensions/...)
    path = Path(root).expanduser() / name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


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
        if spec.origin and CSRC.is_dir() and _prebuilt_is_stale(spec.origin):
            # Importing would register the old kernels for good; build the current sources instead.
            return f"prebuilt finesteer._C at {spec.origin} is older than csrc/ (skipped)"
        importlib.import_module("finesteer._C")
        return "prebuilt finesteer._C"
    except ImportError as exc:
        return f"no prebuilt finesteer._C ({exc})"
    except Exception as exc:  # a stale or broken binary (e.g. built for another torch)
        return f"prebuilt finesteer._C failed to load ({_short(exc, 200)})"


def _cpu_flags() -> tuple[list[str], list[str]]:
    cflags, ldflags = ["-O3", "-DNDEBUG"], []
    if platform.system() == "Linux":
        # at::parallel_for is header code: without OpenMP it would silently run on one thread.
        # The extension then links libgomp.so.1, which resolves to the copy torch already loaded.
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def _jit_build(name: str, sources: tuple[str, ...], cuda: bool) -> tuple[bool, str]:
    missing = [s for s in sources if not (CSRC / s).is_file()]
    if missing:
        return False, f"C++ sources not found ({', '.join(missing)} under {CSRC}); reinstall with a compiler"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return False, f"no C++ compiler ({cxx!r} not on PATH); install one or set CXX"
    try:
        from torch.utils import cpp_extension
    except Exception as exc:
        return False, f"torch.utils.cpp_extension unavailable: {_short(exc)}"
    if shutil.which("ninja") is None and not cpp_extension.is_ninja_available():
        return False, "ninja is not installed (pip install ninja); needed to build the extension at first use"
    cflags, ldflags = _cpu_flags()
    kwargs = dict(
        name=name,
        sources=[str(CSRC / s) for s in sources],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
        verbose=os.environ.get("FINESTEER_VERBOSE_BUILD") == "1",
    )
    if cuda:
        kwargs["extra_cuda_cflags"] = ["-O3", "-DNDEBUG"]
    build_dir = _build_dir(name)
    if build_dir:
        kwargs["build_directory"] = build_dir
    try:
        cpp_extension.load(**kwargs)
    except Exception as exc:
        return False, f"build of {name} failed: {_short(exc)} (set FINESTEER_VERBOSE_BUILD=1 for the log)"
    return True, f"built from csrc/ at first use ({name}, cached in {build_dir or cpp_extension.get_default_build_root()})"


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
    ok, reason = _jit_build("finesteer_cpu_ext", CPU_SOURCES, cuda=False)
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
    ok, reason = _jit_build("finesteer_cuda_ext", CUDA_SOURCES, cuda=True)
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
