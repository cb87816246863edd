"""Build script: the Python package, the Triton kernels folder mapped to ``finesteer._triton``, and
the optional compiled operators ``finesteer._C`` (csrc/).

``finesteer._C`` is built only when torch can be imported at build time (``pip install
--no-build-isolation``, or a build environment with torch). It is a C++ extension with the CPU
kernels, plus the CUDA kernels when CUDA is really usable (torch built with CUDA and nvcc found).
It is optional: without torch or a compiler, or when the compile fails, the install still
succeeds and ``finesteer._ext`` builds the kernels from csrc/ at first use (source checkouts) or
the backends report why they are unavailable and the reference serves the calls.

Environment:
    FINESTEER_SKIP_EXT=1          build no extension at all
    FINESTEER_SKIP_CUDA_BUILD=1   build the CPU kernels only, even with CUDA present
    FINESTEER_CUDA_ARCHS="80;90"  compute capabilities to build for (default "80;90")
"""
import os
import platform
import shutil

from setuptools import find_packages, setup

CPU_SOURCES = ["csrc/ops.cpp", "csrc/cpu/steer_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda/steer_cuda_binding.cpp", "csrc/cuda/steer_cuda.cu"]


def _note(msg: str) -> None:
    print(f"finesteer setup: {msg}")


def _extensions():
    """(ext_modules, cmdclass) for finesteer._C, or ([], {}) when it cannot or should not be built."""
    if os.environ.get("FINESTEER_SKIP_EXT") == "1":
        _note("FINESTEER_SKIP_EXT=1: not building finesteer._C")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # no torch in the build environment (e.g. isolated pip builds)
        _note(f"torch not importable at build time ({type(exc).__name__}); kernels build at first use instead")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _note("no C++ compiler found; not building finesteer._C")
        return [], {}
    cxx = ["-O3", "-DNDEBUG", "-DFINESTEER_PY_MODULE"]
    ldflags = []
    if platform.system() == "Linux":
        cxx.append("-fopenmp")  # at::parallel_for is header code and needs OpenMP to use threads
        ldflags.append("-fopenmp")
    include = [os.path.abspath("csrc")]
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None and nvcc and os.path.exists(nvcc)
                and os.environ.get("FINESTEER_SKIP_CUDA_BUILD") != "1")
    if use_cuda:
        archs = [a.strip() for a in os.environ.get("FINESTEER_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
                 if a.strip()]
        nvcc_flags = ["-O3", "-DNDEBUG"]
        for a in archs:
            nvcc_flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
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

    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["finesteer", "finesteer.*"]) + ["finesteer._triton"],
    package_dir={"finesteer._triton": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
