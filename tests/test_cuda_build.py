"""Build the whole extension, ``finesteer._C`` (CPU and CUDA kernels with their torch bindings), the
way a GPU machine's install does, and check that it loads with every op registered for CPU and CUDA.

``tests/test_nvcc_compile.py`` compiles the .cu files alone (they include no torch header); this
also compiles and links the bindings against torch's CUDA headers and libraries, which needs a
CUDA build of torch. No GPU is needed: loading the library registers the kernels without running
them. Skipped without a CUDA build of torch or without ``nvcc`` (CI runs it in the phase that
installs the newest torch the package accepts, a CUDA build).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc")
OPS = ("steering_vectors", "steer_tokens", "add_vectors")

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None or NVCC is None,
    reason=f"needs a CUDA build of torch (this is {torch.__version__}) and nvcc on PATH"
           f"{'' if NVCC else ' (not found)'}: CI's newest-torch phase builds it")


def _cuda_home() -> str:
    """The CUDA toolkit that PATH's nvcc belongs to. torch guesses it from nvcc's path, which is
    wrong when that nvcc is a wrapper script outside the toolkit; nvcc itself reports its TOP."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    res = subprocess.run([NVCC, "-v", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True, timeout=60)
    top = re.search(r"^#\$ TOP=(.+)$", res.stdout + res.stderr, re.M)
    assert top, f"nvcc did not report its toolkit root:\n{(res.stdout + res.stderr)[-2000:]}"
    return os.path.realpath(top.group(1).strip())


def test_the_extension_builds_and_registers_cpu_and_cuda_kernels(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip(f"setuptools {setuptools.__version__} is older than the build requirement (>= 68)")
    env = {**os.environ, "CUDA_HOME": _cuda_home(), "FINESTEER_CUDA_ARCHS": "90", "MAX_JOBS": "2"}
    env.pop("FINESTEER_SKIP_EXT", None)
    env.pop("FINESTEER_SKIP_CUDA_BUILD", None)
    res = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                          "--build-temp", str(tmp_path / "temp")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1800)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    assert "building finesteer._C with CPU and CUDA kernels" in log, log[-3000:]
    assert "building finesteer._C failed" not in log, log[-6000:]
    libraries = list((tmp_path / "lib" / "finesteer").glob("_C*.so"))
    assert len(libraries) == 1, f"expected one finesteer/_C*.so, found {libraries}"
    # A separate process: this one may already hold the first-use CPU library's finesteer_ext ops.
    script = ("import sys, torch; torch.ops.load_library(sys.argv[1]); "
              "[print(op, torch._C._dispatch_dump('finesteer_ext::' + op).replace(chr(10), ' | ')) "
              f"for op in {OPS!r}]")
    res = subprocess.run([sys.executable, "-c", script, str(libraries[0])], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    dumps = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    for op in OPS:
        assert "CPU: registered" in dumps[op] and "CUDA: registered" in dumps[op], (op, dumps.get(op))
