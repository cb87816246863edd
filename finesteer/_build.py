"""The one build configuration of the compiled operators in ``csrc/``, read by ``setup.py`` (install
time) and :mod:`finesteer._ext` (build at first use).

What it defines: the source lists, the compiler and linker flags, and the *build cache*: where a
first-use build of the kernels lives and when it can be reused. A cache entry is a directory

    <root>/finesteer_<kind>_<key>/          kind = cpu | cuda
        src/...                             a copy of the sources it was built from
        finesteer_<kind>_<key>.so           the library (torch.ops.load_library loads it)
        built.json                          written last: the entry is complete

whose ``key`` hashes everything that changes the binary: the bytes of every source and header, the
flags, the torch version (its C++ ABI), the Python version and implementation, the machine and the
compiler named by ``$CXX``. Two checkouts or virtual environments with the same sources and the
same torch therefore share one build, and neither invalidates the other's (the entry builds from
its own copy of the sources, not from a checkout's paths, so ninja sees identical inputs). Editing a
source gives a new key, hence a new entry; old entries are left in place (delete the root to clean).

``<root>`` is ``$FINESTEER_BUILD_DIR`` if set, else ``$TORCH_EXTENSIONS_DIR/finesteer``, else
``$XDG_CACHE_HOME/finesteer`` (default ``~/.cache/finesteer``).

This file is imported by path from ``setup.py`` before the package is importable, so it uses the
standard library only; torch is passed in (or imported) by the callers that have it.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

#: Bumped when the layout of a cache entry or the meaning of the key changes.
CACHE_FORMAT = 1

#: Sources of each library, relative to csrc/. The CPU library defines the op schemas (ops.cpp),
#: so the CUDA library is only ever loaded after it.
CPU_SOURCES = ("ops.cpp", "cpu/steer_cpu.cpp")
CUDA_SOURCES = ("cuda/steer_cuda_binding.cpp", "cuda/steer_cuda.cu")
#: Every file of these kinds under csrc/ counts as an input of both libraries (headers are shared).
HEADER_SUFFIXES = (".h", ".cuh", ".hpp")

DEFAULT_CUDA_ARCHS = ("80", "90")

#: The one-line notices printed (to stderr) when a first-use build starts; never on a cache hit.
BUILD_NOTICE = {
    "cpu": "building the CPU kernel (first use, ~2 min)",
    "cuda": "building the CUDA kernels (first use, several minutes)",
}


#: Where a wheel carries its copy of csrc/ (setup.py's build_py), inside the package.
PACKAGED_CSRC = "_csrc"


def checkout_csrc_dir() -> Path:
    """csrc/ of the source checkout this file belongs to (absent in a wheel install)."""
    return Path(__file__).resolve().parent.parent / "csrc"


def csrc_dir() -> Path:
    """The C++/CUDA sources to build from: the checkout's csrc/, or in a wheel install the copy
    the wheel carries (``finesteer/_csrc``), so a first-use build works there too. Build keys
    hash the sources' bytes, so both give the same cache entry for the same sources."""
    checkout = checkout_csrc_dir()
    return checkout if checkout.is_dir() else Path(__file__).resolve().parent / PACKAGED_CSRC


def sources_for(kind: str) -> tuple[str, ...]:
    if kind == "cpu":
        return CPU_SOURCES
    if kind == "cuda":
        return CUDA_SOURCES
    raise ValueError(f"unknown kernel library kind {kind!r} (expected 'cpu' or 'cuda')")


def cxx_flags(system: Optional[str] = None) -> list[str]:
    """Host-compiler flags of every C++ source (setup.py and the first-use build alike)."""
    flags = ["-O3", "-DNDEBUG"]
    if (system or platform.system()) == "Linux":
        # at::parallel_for is header code: without OpenMP it would silently run on one thread.
        # The library then links libgomp.so.1, which resolves to the copy torch already loaded.
        flags.append("-fopenmp")
    return flags


def ld_flags(system: Optional[str] = None) -> list[str]:
    return ["-fopenmp"] if (system or platform.system()) == "Linux" else []


def cuda_archs(env: Optional[dict] = None) -> list[str]:
    """Compute capabilities to build for: ``$FINESTEER_CUDA_ARCHS`` ("80;90" or "80,90")."""
    env = os.environ if env is None else env
    raw = env.get("FINESTEER_CUDA_ARCHS", ";".join(DEFAULT_CUDA_ARCHS))
    return [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]


def nvcc_flags(archs: Optional[Sequence[str]] = None) -> list[str]:
    flags = ["-O3", "-DNDEBUG"]
    for a in (cuda_archs() if archs is None else archs):
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def input_files(csrc: Path, kind: str) -> list[str]:
    """Paths (relative to ``csrc``, '/'-separated, sorted) of every file a ``kind`` build reads."""
    csrc = Path(csrc)
    headers = [p.relative_to(csrc).as_posix() for p in csrc.rglob("*")
               if p.is_file() and p.suffix in HEADER_SUFFIXES]
    return sorted(set(sources_for(kind)) | set(headers))


def source_digest(csrc: Path, kind: str) -> str:
    """sha256 over the relative path and bytes of every input file of a ``kind`` build.

    Raises ``FileNotFoundError`` naming the file when a listed source is missing."""
    csrc = Path(csrc)
    h = hashlib.sha256()
    for rel in input_files(csrc, kind):
        path = csrc / rel
        if not path.is_file():
            raise FileNotFoundError(f"finesteer build: source {rel} not found under {csrc}")
        data = path.read_bytes()
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def python_tag() -> str:
    """Interpreter and version, e.g. ``cpython-3.11``: the extension ABI the binary is built for."""
    return f"{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}"


def key_inputs(csrc: Path, kind: str, torch_version: str, python: Optional[str] = None,
               cuda_version: Optional[str] = None, env: Optional[dict] = None,
               extra: Optional[dict] = None) -> dict:
    """Everything the cache key hashes, as a JSON-able dict (also written to ``built.json``).

    ``extra``: further JSON-able facts the binary depends on (the CUDA loader passes the visible
    device's compute capability, for which torch's extension builder adds code)."""
    env = os.environ if env is None else env
    inputs = {
        "format": CACHE_FORMAT,
        "kind": kind,
        "sources": source_digest(csrc, kind),
        "torch": str(torch_version),
        "python": python or python_tag(),
        "machine": f"{platform.system()}-{platform.machine()}",
        "cxx": env.get("CXX", "c++"),
        "cxx_flags": cxx_flags(),
        "ld_flags": ld_flags(),
    }
    if kind == "cuda":
        inputs["cuda"] = str(cuda_version)
        inputs["nvcc_flags"] = nvcc_flags(cuda_archs(env))
        inputs["torch_cuda_arch_list"] = env.get("TORCH_CUDA_ARCH_LIST")
    if extra:
        inputs["extra"] = dict(extra)
    return inputs


def build_key(inputs: dict) -> str:
    """Short stable hash of :func:`key_inputs`' dict (16 hex digits)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_root(env: Optional[dict] = None) -> Path:
    env = os.environ if env is None else env
    if env.get("FINESTEER_BUILD_DIR"):
        return Path(env["FINESTEER_BUILD_DIR"]).expanduser()
    if env.get("TORCH_EXTENSIONS_DIR"):
        return Path(env["TORCH_EXTENSIONS_DIR"]).expanduser() / "finesteer"
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "finesteer"


def library_name(kind: str, key: str) -> str:
    return f"finesteer_{kind}_{key}"


class CacheEntry:
    """One keyed build: its directory, library path, staged sources and completion marker."""

    def __init__(self, root: Path, kind: str, inputs: dict):
        self.kind = kind
        self.inputs = inputs
        self.key = build_key(inputs)
        self.name = library_name(kind, self.key)
        self.dir = Path(root) / self.name
        self.src = self.dir / "src"
        self.marker = self.dir / "built.json"

    @property
    def library(self) -> Path:
        # torch.utils.cpp_extension names the library <name>.so (.pyd on Windows; Linux/macOS here).
        return self.dir / f"{self.name}{'.pyd' if sys.platform == 'win32' else '.so'}"

    def is_complete(self) -> bool:
        """True when a finished build is here (the marker is written only after a successful link)."""
        if not (self.marker.is_file() and self.library.is_file()):
            return False
        try:
            return json.loads(self.marker.read_text()).get("key") == self.key
        except (OSError, ValueError):
            return False

    def stage_sources(self, csrc: Path) -> list[str]:
        """Copy the inputs into ``src/`` (same relative layout, so ``#include "../x.h"`` still
        resolves) and return the staged source paths to compile.

        A file already there with the same bytes is left untouched: its mtime stays, so ninja does
        not rebuild, whichever checkout staged it. Writes go through a temporary file and a rename,
        so a concurrent process never reads a half-written source."""
        csrc = Path(csrc)
        for rel in input_files(csrc, self.kind):
            data = (csrc / rel).read_bytes()
            dst = self.src / rel
            try:
                if dst.read_bytes() == data:
                    continue
            except OSError:
                pass
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dst)
        return [str(self.src / s) for s in sources_for(self.kind)]

    def mark_complete(self) -> None:
        tmp = self.marker.with_name(f".built.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": self.key, "library": self.library.name, "inputs": self.inputs},
                                  indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.marker)


def cache_entry(kind: str, torch_version: str, cuda_version: Optional[str] = None, csrc: Optional[Path] = None,
                root: Optional[Path] = None, env: Optional[dict] = None, extra: Optional[dict] = None) -> CacheEntry:
    """The cache entry a ``kind`` build of ``csrc`` (default: this checkout's) with this torch uses."""
    csrc = csrc_dir() if csrc is None else Path(csrc)
    inputs = key_inputs(csrc, kind, torch_version, cuda_version=cuda_version, env=env, extra=extra)
    return CacheEntry(cache_root(env) if root is None else Path(root), kind, inputs)


def jit_build(entry: CacheEntry, csrc: Path, verbose: bool = False, notice: bool = True,
              stream=None) -> Path:
    """Build ``entry`` from ``csrc`` with ``torch.utils.cpp_extension`` (ninja) unless it is
    complete already; returns the library path. Does not load it into the process.

    Prints :data:`BUILD_NOTICE` (one line, to ``stream``, default stderr) when it really compiles.
    Concurrent builders of one entry are serialised by torch's lock file in the entry directory."""
    if entry.is_complete():
        return entry.library
    from torch.utils import cpp_extension  # the caller has checked torch is importable

    if notice:
        print(f"finesteer: {BUILD_NOTICE[entry.kind]} -> {entry.dir}", file=stream or sys.stderr, flush=True)
    entry.dir.mkdir(parents=True, exist_ok=True)
    sources = entry.stage_sources(csrc)
    kwargs = dict(name=entry.name, sources=sources, extra_cflags=cxx_flags(), extra_ldflags=ld_flags(),
                  extra_include_paths=[str(entry.src)], build_directory=str(entry.dir),
                  is_python_module=False, verbose=verbose)
    if entry.kind == "cuda":
        kwargs["extra_cuda_cflags"] = nvcc_flags(cuda_archs())
    # cpp_extension.load also loads the library; _jit_compile alone would be private API.
    cpp_extension.load(**kwargs)
    entry.mark_complete()
    return entry.library


def _prebuild_main(argv: Iterable[str]) -> int:
    """``python finesteer/_build.py prebuild``: build the CPU kernel into the keyed cache.

    setup.py runs this with the *target* interpreter when pip's isolated build environment has no
    torch, so the first use after ``pip install -e .`` finds the kernel built. Exit status 0 when
    the kernel is built or was already cached, 1 with a message on stderr otherwise."""
    argv = list(argv)
    if argv[:1] != ["prebuild"]:
        print("usage: python finesteer/_build.py prebuild", file=sys.stderr)
        return 2
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - report any import problem
        print(f"finesteer prebuild: torch not importable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    try:
        entry = cache_entry("cpu", torch.__version__)
        cached = entry.is_complete()
        path = jit_build(entry, csrc_dir(), verbose=os.environ.get("FINESTEER_VERBOSE_BUILD") == "1")
    except Exception as exc:  # noqa: BLE001 - a failed build must be reported, not raised
        print(f"finesteer prebuild: CPU kernel build failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    print(f"finesteer prebuild: CPU kernel {'already cached' if cached else 'built'} at {path}")
    return 0


if __name__ == "__main__":
    # Run as a script, sys.path[0] is finesteer/ itself, whose modules (ops, data, ...) must not
    # shadow top-level names for torch's imports.
    if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        del sys.path[0]
    sys.exit(_prebuild_main(sys.argv[1:]))
