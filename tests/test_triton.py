"""What only the ``triton`` backend has: the split-d path, its block configurations, compiling
the kernels for sm_90 without a GPU, and its launch options. Everything it shares with the other
backends is in ``tests/test_backends.py``.

Runs compiled on a CUDA device, otherwise on CPU tensors through Triton's interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports the kernels).
Nothing is imported or compiled at collection time: the ``k`` fixture loads the kernels (or
skips with the backend's reason) when the first test runs.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import types

import pytest
import torch

import finesteer as fs

from .utils import FROM_FOLDER_PRELUDE, bank_index, check_against_reference, make_bank, random_h

#: The launchers' GPU block configuration (16-row blocks, narrow d tiles, 16-unit epilogue
#: steps), forced on small shapes so the interpreter also walks the GPU's loop structure.
GPU_CONFIG = dict(BLOCK_T=16, BLOCK_D=16, BLOCK_DO=64, BLOCK_H=16, BLOCK_HE=16, num_warps=4, num_stages=1)


@pytest.fixture(scope="module")
def k():
    """The kernels module (``finesteer._triton.steer``)."""
    listing = fs.backends()["triton"]
    if not listing.startswith("available"):
        pytest.skip(f"triton backend {listing}")
    from finesteer.fused import triton as backend

    return backend._kernels()


@pytest.fixture(scope="module")
def dev(k):
    return torch.device("cpu" if k.INTERPRETED else "cuda")


def launcher(k, **options):
    """The two launchers with fixed options (``split_d``, ``config``), shaped like a backend."""
    return types.SimpleNamespace(steer_tokens=functools.partial(k.steer_tokens_forward, **options),
                                 steering_vectors=functools.partial(k.steering_vectors_forward, **options))


@pytest.mark.parametrize("d, T, split", [(96, 1, 7), (200, 20, 3), (100, 5, 1000),
                                         pytest.param(4096, 3, 32, marks=pytest.mark.slow)])
def test_split_d_matches_reference_and_is_deterministic(k, dev, d, T, split):
    """Several programs per row block (the last to arrive finishes) give the reference's result,
    and the same bits on every run: partials are summed in a fixed order."""
    bank = make_bank(d, device=dev)
    h = random_h(T, d, torch.bfloat16, seed=5, device=dev)
    index = bank_index(T, bank.num_steerers, device=dev)
    check_against_reference(launcher(k, split_d=split), h, bank, index, f"split={split}")
    a = k.steer_tokens_forward(h, bank, index, split_d=split)
    assert torch.equal(a, k.steer_tokens_forward(h, bank, index, split_d=split))


@pytest.mark.parametrize("d, T, H, split, block_t", [(80, 37, 40, 1, 16), (80, 37, 40, 2, 16), (200, 5, 300, 1, 16),
                                                     (80, 7, 40, 3, 2), (80, 1, 40, 2, 1)])
def test_gpu_block_configuration(k, dev, d, T, H, split, block_t):
    """The GPU's block sizes: several row blocks (tl.dot or, below 16 rows, broadcast-reduce),
    several phase-1 H chunks, masked tails."""
    bank = make_bank(d, [dict(r=3, K=5, H=H, m=3, gate_mode="hard"), dict(r=1, K=1, H=7, m=1, gate_mode="soft")],
                     device=dev)
    h = random_h(T, d, torch.float16, seed=7, device=dev)
    check_against_reference(launcher(k, split_d=split, config=dict(GPU_CONFIG, BLOCK_T=block_t)), h, bank,
                            bank_index(T, 2, device=dev), "gpu-config")


def test_wide_mlp_chunks_over_H(k, dev):
    """H > 256: phase 1 and the epilogue both walk the hidden units in several chunks."""
    bank = make_bank(96, [dict(r=2, K=4, H=300, m=5, gate_mode="off")], device=dev)
    check_against_reference(launcher(k), random_h(6, 96, device=dev), bank, None, "H=300")


@pytest.mark.parametrize("config, msg", [(dict(BLOCK_D=24), "BLOCK_D=24 must be a power of two ≥ 16"),
                                         (dict(BLOCK_T=3), "BLOCK_T=3 must be a power of two ≥ 1"),
                                         (dict(BLOCK_Q=16), "unknown config keys")])
def test_bad_launch_config(k, dev, config, msg):
    bank = make_bank(32, device=dev)
    with pytest.raises(ValueError, match=msg):
        k.steer_tokens_forward(random_h(4, 32, device=dev), bank, None, config=config)


def test_wrong_device_is_named(k, dev):
    bank = make_bank(32, device=dev)
    if dev.type == "cuda":
        with pytest.raises(RuntimeError, match="CPU tensor"):
            k.steer_tokens_forward(torch.randn(2, 32), bank.to("cpu"), None)
    elif torch.cuda.is_available():  # interpreted kernels refuse CUDA tensors
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            k.steer_tokens_forward(torch.randn(2, 32, device="cuda"), bank, None)
    with pytest.raises(RuntimeError, match="is on meta"):
        k.steer_tokens_forward(torch.empty(2, 32, device="meta"), bank, None)


def test_kernels_found_without_an_install(tmp_path):
    """A source tree on sys.path (no pip install, no symlink) finds kernels/ as finesteer._triton."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (FROM_FOLDER_PRELUDE + "import finesteer; "
              "assert finesteer.__file__.startswith(sys.argv[1]), finesteer.__file__; "
              "from finesteer.fused import triton as t; k = t._kernels(); print(k.__file__)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", script, root], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    if res.returncode and "No module named 'triton'" in res.stderr:
        pytest.skip("triton is not installed")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == os.path.join(root, "kernels", "steer.py")


def test_checkout_kernels_folder_does_not_shadow_a_kernels_distribution(tmp_path):
    """Python run from a checkout's root (``python -m pytest``, a script there) has the root on
    sys.path; ``import kernels`` must still find the installed ``kernels`` distribution (imported
    by transformers ≥ 5.25), not the Triton sources' folder."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("DISTRIBUTION = True\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.DISTRIBUTION, kernels.__file__)"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[0] == "True"
    assert not os.path.exists(os.path.join(root, "kernels", "__init__.py"))


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """PTX + cubin for sm_90 with Triton's bundled toolchain: catches what the interpreter lets
    through (tl.dot shape minimums, layout and type errors) on a machine without a GPU."""
    pytest.importorskip("triton")
    import triton.backends

    from finesteer.fused import triton as backend

    if backend._release(triton.__version__) < backend.MIN_TRITON:
        pytest.skip(f"triton {triton.__version__} is older than the kernels' tested minimum {backend.MIN_TRITON}")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton install has no NVIDIA backend")
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-m", "finesteer._triton.compile_check", "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, f"compile_check failed:\n{res.stdout}\n{res.stderr[-4000:]}"
    assert res.stdout.count(": ok") == 5, res.stdout


def test_a_triton_older_than_the_tested_minimum_is_reported_unavailable(monkeypatch):
    """Triton 3.2 (torch 2.6's) fails the kernels' tests, so the backend says so and steps aside."""
    from finesteer.fused import triton as backend

    assert backend._release("3.2.0") < backend.MIN_TRITON <= backend._release("3.4.0")
    assert backend._release("3.9.0+git1a2b") == (3, 9) and backend._release("4.0") >= backend.MIN_TRITON
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.2.0"))
    ok, reason = backend.available()
    assert not ok and "triton 3.2.0 is older than 3.4" in reason
