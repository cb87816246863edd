"""The kernels' build cache (finesteer/_build.py) and its use by the first-use loader (finesteer/_ext.py).

Unit tests here never compile: they check the cache key, the staging of sources and the notice
with fakes. One slow test builds (or reuses) the real CPU kernel and checks that a second
checkout of the sources on the same machine reuses the first one's build without recompiling.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finesteer import _build, _ext

from .utils import FROM_FOLDER_PRELUDE

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
needs_csrc = pytest.mark.skipif(not (CSRC / "cpu" / "steer_cpu.cpp").is_file(), reason="no csrc/ checkout")


def copy_csrc(dst: Path) -> Path:
    shutil.copytree(CSRC, dst, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))
    return dst


def key(csrc, torch_version="2.13.0+cpu", python="cpython-3.11", kind="cpu", env=None, cuda=None):
    return _build.build_key(_build.key_inputs(csrc, kind, torch_version, python=python, cuda_version=cuda,
                                              env={} if env is None else env))


# ---- the cache key -----------------------------------------------------------------------------

@needs_csrc
def test_key_is_the_same_for_identical_sources_in_two_checkouts(tmp_path):
    a, b = copy_csrc(tmp_path / "a" / "csrc"), copy_csrc(tmp_path / "b" / "csrc")
    assert key(a) == key(b) == key(CSRC)


@needs_csrc
@pytest.mark.parametrize("rel", ["cpu/steer_cpu.cpp", "ops.cpp", "steer_args.h"])
def test_key_changes_when_one_source_byte_changes(tmp_path, rel):
    src = copy_csrc(tmp_path / "csrc")
    before = key(src)
    path = src / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert key(src) != before


@needs_csrc
def test_cpu_key_ignores_cuda_only_sources_but_cuda_key_does_not(tmp_path):
    src = copy_csrc(tmp_path / "csrc")
    cpu_before, cuda_before = key(src), key(src, kind="cuda", cuda="12.4")
    (src / "cuda" / "steer_cuda.cu").write_text((src / "cuda" / "steer_cuda.cu").read_text() + "\n// edit\n")
    assert key(src) == cpu_before
    assert key(src, kind="cuda", cuda="12.4") != cuda_before


@needs_csrc
def test_key_changes_with_torch_python_compiler_and_cuda():
    base = key(CSRC)
    assert key(CSRC, torch_version="2.12.0+cpu") != base
    assert key(CSRC, python="cpython-3.12") != base
    assert key(CSRC, env={"CXX": "clang++"}) != base
    assert key(CSRC, kind="cuda", cuda="12.4") != key(CSRC, kind="cuda", cuda="12.8")
    assert key(CSRC, kind="cuda", cuda="12.4", env={"FINESTEER_CUDA_ARCHS": "90"}) != \
        key(CSRC, kind="cuda", cuda="12.4", env={"FINESTEER_CUDA_ARCHS": "80;90"})
    assert key(CSRC, kind="cuda", cuda="12.4", env={"TORCH_CUDA_ARCH_LIST": "9.0"}) != \
        key(CSRC, kind="cuda", cuda="12.4")
    with_cap = lambda cap: _build.build_key(_build.key_inputs(  # noqa: E731
        CSRC, "cuda", "2.13.0", cuda_version="12.4", env={}, extra={"device_capability": cap}))
    assert with_cap("9.0") != with_cap("8.0")


def test_python_tag_names_this_interpreter():
    assert _build.python_tag() == f"{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}"


def test_missing_source_is_reported_by_name(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "ops.cpp").write_text("// only one of the two sources\n")
    with pytest.raises(FileNotFoundError, match="cpu/steer_cpu.cpp"):
        _build.source_digest(tmp_path, "cpu")
    with pytest.raises(ValueError, match="unknown kernel library kind"):
        _build.sources_for("metal")


def test_cache_root_precedence(tmp_path):
    assert _build.cache_root({"FINESTEER_BUILD_DIR": str(tmp_path / "fs"), "TORCH_EXTENSIONS_DIR": "x"}) == \
        tmp_path / "fs"
    assert _build.cache_root({"TORCH_EXTENSIONS_DIR": str(tmp_path / "te")}) == tmp_path / "te" / "finesteer"
    assert _build.cache_root({"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == tmp_path / "xdg" / "finesteer"


# ---- entries, staging, the notice --------------------------------------------------------------

@needs_csrc
def test_two_checkouts_map_to_one_entry_and_staging_keeps_mtimes(tmp_path):
    a, b = copy_csrc(tmp_path / "a"), copy_csrc(tmp_path / "b")
    env = {"FINESTEER_BUILD_DIR": str(tmp_path / "cache")}
    ea = _build.cache_entry("cpu", "2.13.0+cpu", csrc=a, env=env)
    eb = _build.cache_entry("cpu", "2.13.0+cpu", csrc=b, env=env)
    assert ea.dir == eb.dir and ea.name == eb.name and ea.name.startswith("finesteer_cpu_")
    staged = ea.stage_sources(a)
    assert staged == [str(ea.src / s) for s in _build.CPU_SOURCES]
    assert (ea.src / "steer_args.h").read_bytes() == (CSRC / "steer_args.h").read_bytes()
    mtimes = {p: os.stat(p).st_mtime_ns for p in staged}
    os.utime(b / "ops.cpp", ns=(1, 1))  # the other checkout's files are older/newer: irrelevant
    eb.stage_sources(b)
    assert {p: os.stat(p).st_mtime_ns for p in staged} == mtimes  # ninja sees nothing new


@needs_csrc
def test_entry_is_complete_only_with_marker_and_library(tmp_path):
    entry = _build.cache_entry("cpu", "2.13.0+cpu", csrc=CSRC, root=tmp_path)
    entry.dir.mkdir(parents=True)
    assert not entry.is_complete()
    entry.library.write_bytes(b"\x7fELF")
    assert not entry.is_complete()  # a library without the marker may be half-linked
    entry.mark_complete()
    assert entry.is_complete()
    assert json.loads(entry.marker.read_text())["inputs"]["torch"] == "2.13.0+cpu"
    entry.marker.write_text(json.dumps({"key": "something-else"}))
    assert not entry.is_complete()


@needs_csrc
def test_build_notice_once_then_cache_hit(tmp_path, monkeypatch, capsys):
    """jit_build says "building the CPU kernel (first use, ~2 min)" when it compiles, never on a hit."""
    from torch.utils import cpp_extension

    calls = []

    def fake_load(name, sources, build_directory, **kwargs):
        calls.append(sources)
        assert all(Path(s).is_file() for s in sources)  # compiled from the staged copy
        assert all(str(Path(build_directory)) in s for s in sources)
        Path(build_directory, f"{name}.so").write_bytes(b"\x7fELF")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    entry = _build.cache_entry("cpu", torch.__version__, csrc=CSRC, root=tmp_path)
    lib = _build.jit_build(entry, CSRC)
    first = _our_lines(capsys.readouterr().err)
    assert len(first) == 1 and "building the CPU kernel (first use, ~2 min)" in first[0]
    assert lib == entry.library and entry.is_complete() and len(calls) == 1
    again = _build.cache_entry("cpu", torch.__version__, csrc=CSRC, root=tmp_path)
    assert _build.jit_build(again, CSRC) == lib
    assert _our_lines(capsys.readouterr().err) == [] and len(calls) == 1


def _our_lines(stderr: str) -> list:
    """``stderr``'s lines without torch's own: a CUDA build of torch on a machine without a GPU logs
    "No CUDA runtime is found" when its extension builder starts (glog-prefixed from 2.14 on)."""
    return [line for line in stderr.splitlines()
            if not re.match(r"([IWEF]\d{4} \d\d:\d\d:\d\d.*\] )?No CUDA runtime is found", line)]


@needs_csrc
def test_loader_takes_a_complete_entry_without_compiling(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FINESTEER_BUILD_DIR", str(tmp_path))
    entry = _build.cache_entry("cpu", torch.__version__, cuda_version=torch.version.cuda, csrc=_ext.CSRC)
    entry.dir.mkdir(parents=True)
    entry.library.write_bytes(b"\x7fELF")
    entry.mark_complete()
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", lambda path: loaded.append(path))
    monkeypatch.setattr(_build, "jit_build", lambda *a, **k: pytest.fail("a cache hit must not build"))
    ok, reason = _ext._jit_build("cpu")
    assert ok and "build cache" in reason and loaded == [str(entry.library)]
    assert capsys.readouterr().err == ""


@needs_csrc
def test_loader_reports_a_broken_cached_library(tmp_path, monkeypatch):
    monkeypatch.setenv("FINESTEER_BUILD_DIR", str(tmp_path))
    entry = _build.cache_entry("cpu", torch.__version__, cuda_version=torch.version.cuda, csrc=_ext.CSRC)
    entry.dir.mkdir(parents=True)
    entry.library.write_bytes(b"not a library")
    entry.mark_complete()
    ok, reason = _ext._jit_build("cpu")
    assert not ok and "failed to load" in reason and str(entry.dir) in reason


@needs_csrc
def test_loader_names_a_missing_ninja(tmp_path, monkeypatch):
    """No cached build and no ninja: a clear reason (the dependency is what fixes it), no attempt."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("FINESTEER_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setattr(_build, "jit_build", lambda *a, **k: pytest.fail("must not try to build"))
    ok, reason = _ext._jit_build("cpu")
    assert not ok and "ninja is not installed (pip install ninja)" in reason


def test_setup_py_reads_the_same_configuration():
    """setup.py takes its sources and flags from finesteer/_build.py (loaded by path)."""
    text = (ROOT / "setup.py").read_text()
    assert "_build.py" in text and "BUILD.cxx_flags()" in text and "BUILD.CPU_SOURCES" in text
    spec = importlib.util.spec_from_file_location("_fs_build_by_path", ROOT / "finesteer" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # stdlib only: importable before the package and without torch
    assert mod.CPU_SOURCES == _build.CPU_SOURCES and mod.cxx_flags() == _build.cxx_flags()


def test_prebuild_script_usage():
    proc = subprocess.run([sys.executable, str(ROOT / "finesteer" / "_build.py")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: python finesteer/_build.py prebuild" in proc.stderr


# ---- a real second checkout ------------------------------------------------------------------

# Imports finesteer from the checkout given as argv[1] and loads its CPU kernel.
LOAD_AND_REPORT = """
import sys
sys.path.insert(0, sys.argv[1])
import finesteer
from finesteer import _ext
assert finesteer.__file__.startswith(sys.argv[1]), finesteer.__file__
ok, reason = _ext.load_cpu()
print("OK" if ok else "FAIL", reason)
"""


@pytest.mark.slow
@needs_csrc
def test_second_checkout_reuses_the_first_ones_build(tmp_path):
    """Two checkouts (the real one and a copy elsewhere) load the same cached library: the second
    neither compiles nor touches it. Compiles once (~2 min) when the cache is cold."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    second = tmp_path / "second-checkout"
    shutil.copytree(ROOT / "finesteer", second / "finesteer",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "demo"))
    copy_csrc(second / "csrc")
    env = {k: v for k, v in os.environ.items() if k != "FINESTEER_DISABLE_EXT"}

    def load_from(checkout: Path):
        proc = subprocess.run([sys.executable, "-c", LOAD_AND_REPORT, str(checkout)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    first = load_from(ROOT)
    if "prebuilt finesteer._C" in first.stdout:
        pytest.skip("this checkout loads an install-time finesteer._C, not the build cache")
    assert first.stdout.startswith("OK"), first.stdout + first.stderr
    entry = _build.cache_entry("cpu", torch.__version__, cuda_version=torch.version.cuda, csrc=CSRC)
    assert entry.is_complete()
    stamp = {p: os.stat(p).st_mtime_ns for p in [entry.library, *entry.dir.rglob("*.o")]}

    # setup.py's install-time prebuild (run as a script) finds the same entry and does nothing.
    pre = subprocess.run([sys.executable, str(ROOT / "finesteer" / "_build.py"), "prebuild"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert pre.returncode == 0 and "already cached" in pre.stdout and str(entry.library) in pre.stdout, pre
    assert "building the CPU kernel" not in pre.stderr

    second_run = load_from(second)
    assert second_run.stdout.startswith("OK") and "build cache" in second_run.stdout, second_run.stdout
    assert str(entry.dir) in second_run.stdout
    assert "building the CPU kernel" not in second_run.stderr
    assert {p: os.stat(p).st_mtime_ns for p in stamp} == stamp  # nothing recompiled or relinked


# ---- what a wheel carries ----------------------------------------------------------------------

@needs_csrc
def test_wheel_build_carries_the_triton_kernels_and_the_csrc_sources(tmp_path):
    """setup.py's build_py (a non-editable build, i.e. a wheel) puts kernels/*.py into
    finesteer/_triton/ and csrc/'s sources and headers into finesteer/_csrc/; the installed
    package then imports the kernels from itself and keys a first-use build of the C++ kernels
    exactly as a checkout does (same sources, same cache entry)."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip(f"setuptools {setuptools.__version__} is older than the build requirement (>= 68)")
    env = {**os.environ, "FINESTEER_SKIP_EXT": "1"}
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    package = tmp_path / "lib" / "finesteer"
    kernels = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert "steer.py" in kernels and (package / "_triton" / "__init__.py").is_file()
    for name in kernels:
        assert (package / "_triton" / name).read_bytes() == (ROOT / "kernels" / name).read_bytes(), name
    wanted = set(_build.input_files(CSRC, "cpu")) | set(_build.input_files(CSRC, "cuda"))
    carried = {p.relative_to(package / "_csrc").as_posix() for p in (package / "_csrc").rglob("*") if p.is_file()}
    assert carried == wanted
    # The installed layout, without the editable install's finder: kernels and sources from the package.
    script = (FROM_FOLDER_PRELUDE + "import json, torch; import finesteer._triton as t; "
              "from finesteer import _build, _ext; "
              "print(json.dumps({'triton': list(t.__path__), 'csrc': str(_ext.CSRC), "
              "'checkout': _ext.CSRC_IS_CHECKOUT, 'key': _build.cache_entry('cpu', torch.__version__).key}))")
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "lib")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout)
    assert info["triton"] == [str(package / "_triton")]
    assert info["csrc"] == str(package / "_csrc") and info["checkout"] is False
    assert info["key"] == _build.cache_entry("cpu", torch.__version__, csrc=CSRC).key
