"""Compile every CUDA source in csrc/cuda/ with ``nvcc -c`` for sm_80 and sm_90.

This needs the CUDA toolkit only (no GPU, no CUDA build of torch): the .cu files include no torch
header by design. It catches syntax and template errors in the kernels on CPU-only machines;
correctness on a device is tests/test_backends.py's job (and tests/test_cuda.py's). Skipped when ``nvcc`` is not on PATH.
"""
from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))
ARCHS = ("80", "90")
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: the CUDA sources cannot be compile-checked")


def _compile(src: Path, arch: str, out_dir: Path) -> subprocess.CompletedProcess:
    # The __CUDA_NO_*__ defines are the ones torch's extension builds add: the kernels must not rely
    # on implicit half/bfloat16 conversions or operators.
    cmd = [NVCC, "-c", "-std=c++17", "-O3", "-DNDEBUG", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-I", str(CSRC), "-I", str(CSRC / "cuda"), "-Xcompiler", "-Wall",
           str(src), "-o", str(out_dir / f"{src.stem}_sm{arch}.o")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files under {CSRC / 'cuda'}"


def test_nvcc_compiles_every_cu_file(tmp_path):
    jobs = [(src, arch) for src in CU_FILES for arch in ARCHS]
    # One nvcc per (file, arch), two at a time: CI has two cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _compile(job[0], job[1], tmp_path), jobs))
    failures = [f"{src.name} for sm_{arch}:\n{res.stderr[-4000:]}"
                for (src, arch), res in zip(jobs, results) if res.returncode != 0]
    assert not failures, "nvcc failed:\n" + "\n\n".join(failures)
    for src, arch in jobs:
        assert (tmp_path / f"{src.stem}_sm{arch}.o").stat().st_size > 0
