"""Build script: the Python package, the Triton kernels (``kernels/``, copied into wheels as
``finesteer._triton``), and the compiled operators (csrc/, whose sources wheels carry too). Sources and flags come from
``finesteer/_build.py``, the one build configuration that the first-use build in
``finesteer/_ext.py`` reads too.

Two install-time builds, depending on whether torch is importable *here* (in the build environment):

- torch importable (``pip install --no-build-isolation``): ``finesteer._C`` is built as a C++
  extension with the CPU kernels, plus the CUDA kernels when CUDA is really usable (torch built
  with CUDA and nvcc found). It goes into the wheel (or next to the sources in an editable install).
- torch not importable (pip's default isolated build, e.g. the README's ``pip install -e .``): if
  the *target* interpreter has torch, the CPU kernel is built into the keyed first-use build cache
  (``python finesteer/_build.py prebuild`` in a subprocess), so the first use of the installed
  package loads it instead of compiling. The CUDA kernels are left to the first use.

Both are optional: without torch or a compiler, or when the compile fails, the install still
succeeds; ``finesteer._ext`` then builds the kernels at first use (source checkouts) or the backends
report why they are unavailable and the reference serves the calls. Building needs a C++ compiler
and ``ninja`` (a build requirement and a dependency of the package).

Environment:
    FINESTEER_SKIP_EXT=1          build no extension at all, at install time
    FINESTEER_SKIP_CUDA_BUILD=1   build the CPU kernels only, even with CUDA present
    FINESTEER_CUDA_ARCHS="80;90"  compute capabilities to build for (default "80;90")
"""
import importlib.util
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    """finesteer/_build.py, loaded by path: the package is not importable while it is being built."""
    spec = importlib.util.spec_from_file_location("_finesteer_build", os.path.join(HERE, "finesteer", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _load_build_config()
CPU_SOURCES = [f"csrc/{s}" for s in BUILD.CPU_SOURCES]
CUDA_SOURCES = [f"csrc/{s}" for s in BUILD.CUDA_SOURCES]


def _note(msg: str) -> None:
    print(f"finesteer setup: {msg}")


class TritonKernelsBuildPy(build_py):
    """``build_py`` that puts what lives outside ``finesteer/`` into a (non-editable) build, so a
    wheel carries it: the Triton sources ``kernels/*.py`` as ``finesteer/_triton/``, and the
    C++/CUDA sources and headers of ``csrc/`` as ``finesteer/_csrc/``, from which the first use
    builds the kernels when the wheel has no ``finesteer._C`` (``finesteer/_build.py``). An
    editable install copies nothing: it reads the checkout's folders. ``kernels/`` is not a
    package of its own: as a regular package named ``kernels`` in a checkout's root it would
    shadow the ``kernels`` distribution that transformers imports."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        self._copy_tree("kernels", os.path.join("finesteer", "_triton"), (".py",))
        self._copy_tree("csrc", os.path.join("finesteer", BUILD.PACKAGED_CSRC),
                        (".cpp", ".cu") + BUILD.HEADER_SUFFIXES)

    def _copy_tree(self, source: str, target: str, suffixes: tuple) -> None:
        for folder, _, names in sorted(os.walk(os.path.join(HERE, source))):
            rel = os.path.relpath(folder, os.path.join(HERE, source))
            for name in sorted(n for n in names if n.endswith(suffixes)):
                out = os.path.normpath(os.path.join(self.build_lib, target, rel))
                self.mkpath(out)
                self.copy_file(os.path.join(folder, name), os.path.join(out, name))


class PrebuildCacheBuildPy(TritonKernelsBuildPy):
    """``build_py`` that also builds the CPU kernel into the first-use build cache, with the target
    interpreter, when this (isolated) build environment has no torch but the target has.

    Runs in ``build_py`` because it always runs (also for editable installs), while ``build_ext``
    is skipped when there are no extension modules. A failure only warns: the first use builds."""

    def run(self):
        super().run()
        if os.environ.get("FINESTEER_SKIP_EXT") == "1" or getattr(self.distribution, "_finesteer_prebuilt", False):
            return
        self.distribution._finesteer_prebuilt = True
        if not getattr(self, "editable_mode", False):
            # A wheel may be installed on another machine than the one building it: no prebuild.
            _note("not an editable install: the wheel has no finesteer._C (install with --no-build-isolation "
                  "to build it now); the first use builds the kernels from the sources the wheel carries")
            return
        # pip's isolated build hides the target environment's site-packages through PYTHONPATH
        # (plus PYTHONNOUSERSITE); without them the same interpreter sees the target's torch. PATH
        # is kept, so the build environment's ninja (a build requirement) is found.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
        probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
        if probe.returncode != 0:
            _note("torch is not installed in the target environment either; the CPU kernel builds at first use")
            return
        _note(f"CPU kernel -> first-use build cache in {BUILD.cache_root(env)} (a build takes ~2 min; "
              f"a cached one is reused)")
        proc = subprocess.run([sys.executable, os.path.join(HERE, "finesteer", "_build.py"), "prebuild"], env=env,
                              capture_output=True, text=True)
        if proc.returncode == 0:
            lines = proc.stdout.strip().splitlines()
            _note(lines[-1] if lines else "CPU kernel built")
        else:
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            _note("WARNING: " + (lines[-1] if lines else f"prebuild exited with {proc.returncode}")
                  + "; the CPU kernel builds at first use instead")


def _extensions():
    """(ext_modules, cmdclass): finesteer._C, or no extension when it cannot or should not be built;
    cmdclass always has a ``build_py`` that puts the Triton kernels into wheels."""
    if os.environ.get("FINESTEER_SKIP_EXT") == "1":
        _note("FINESTEER_SKIP_EXT=1: not building finesteer._C")
        return [], {"build_py": TritonKernelsBuildPy}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # no torch in the build environment (e.g. isolated pip builds)
        _note(f"torch not importable in the build environment ({type(exc).__name__}); not building finesteer._C")
        return [], {"build_py": PrebuildCacheBuildPy}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _note("no C++ compiler found; not building finesteer._C")
        return [], {"build_py": TritonKernelsBuildPy}
    cxx = BUILD.cxx_flags() + ["-DFINESTEER_PY_MODULE"]
    ldflags = BUILD.ld_flags()
    include = [os.path.join(HERE, "csrc")]
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None and nvcc and os.path.exists(nvcc)
                and os.environ.get("FINESTEER_SKIP_CUDA_BUILD") != "1")
    if use_cuda:
        archs = BUILD.cuda_archs()
        nvcc_flags = BUILD.nvcc_flags(archs)
        ext = CUDAExtension("finesteer._C", CPU_SOURCES + CUDA_SOURCES, include_dirs=include,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags}, extra_link_args=ldflags)
        _note(f"building finesteer._C with CPU and CUDA kernels for sm_{', sm_'.join(archs)}")
    else:
        why = ("FINESTEER_SKIP_CUDA_BUILD=1" if os.environ.get("FINESTEER_SKIP_CUDA_BUILD") == "1"
               else "torch without CUDA" if torch.version.cuda is None else "nvcc not found")
        ext = CppExtension("finesteer._C", CPU_SOURCES, include_dirs=include,
                           extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)
        _note(f"building finesteer._C with CPU kernels only ({why})")
    class OptionalBuildExtension(BuildExtension):
        """A failed compile warns instead of failing the install (torch's ninja build raises a
        RuntimeError, which setuptools' own ``optional`` handling does not catch)."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001 - any compiler/toolchain failure
                _note(f"WARNING: building finesteer._C failed ({type(exc).__name__}: {exc}); installing without "
                      f"it (kernels build at first use from a source checkout, else the reference is used)")
                self.extensions = []  # nothing to copy or package

    return [ext], {"build_ext": OptionalBuildExtension, "build_py": TritonKernelsBuildPy}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["finesteer", "finesteer.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
