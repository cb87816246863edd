"""pytest-benchmark version of bench_steer.py (not collected by the default run: testpaths = tests).

    python -m pytest benchmarks/test_bench_steer.py --benchmark-only
    python -m pytest benchmarks/test_bench_steer.py --benchmark-only --benchmark-json=out.json

Times the reference, the BLAS floor, every available fused backend on a pre-packed bank and the
public call ``finesteer.steer(h, steerer, backend=...)`` (provider ``<backend>_api``) at the
DESIGN §7 decode shapes (d = 2048, H = 256, T ∈ {1, 4}) on the default device. Results are
measurements, never assertions; the only checks are that the fused output agrees with the reference.
"""
from __future__ import annotations

import pytest
import torch

from bench_steer import FUSED, random_steerer

import finesteer
from finesteer import reference
from finesteer._backends import _load

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPES = [(2048, 1), (2048, 4), (4096, 1), (4096, 64)]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=sorted({d for d, _ in SHAPES}))
def steerer(request):
    return random_steerer(request.param)


@pytest.mark.parametrize("T", sorted({T for _, T in SHAPES}))
@pytest.mark.parametrize("provider", ("reference", "floor") + FUSED + tuple(f"{n}_api" for n in FUSED))
def test_steer_tokens(benchmark, steerer, T, provider):
    bank = steerer.bank(device=DEVICE, weight_dtype=DTYPE)
    d = bank.hidden_size
    if (d, T) not in SHAPES:
        pytest.skip("shape not in the benchmark grid")
    h = torch.randn(T, d, device=DEVICE).to(DTYPE)
    if provider == "reference":
        fn = lambda: reference.steer_tokens(h, bank, None)  # noqa: E731
    elif provider == "floor":
        A, B = bank.A[0], bank.B[0]
        coef = torch.randn(T, bank.K + bank.m, device=DEVICE).to(DTYPE)
        fn = lambda: (h @ A, coef @ B)  # noqa: E731
    else:
        name = provider.removesuffix("_api")
        mod, reason = _load(name)
        if mod is None or not mod.supports(DEVICE):
            pytest.skip(f"{name}: {reason if mod is None else 'does not support ' + str(DEVICE)}")
        if provider.endswith("_api"):  # the public call: fp32 weights packed once, cached on the steerer
            fn = lambda: finesteer.steer(h, steerer, backend=name)  # noqa: E731
            exp = reference.steer_tokens(h, steerer.bank(device=DEVICE), None)
        else:
            fn = lambda: mod.steer_tokens(h, bank, None)  # noqa: E731
            exp = reference.steer_tokens(h, bank, None)
        torch.testing.assert_close(fn().float(), exp.float(), atol=2e-2, rtol=2e-2)
    benchmark.extra_info.update(d=d, T=T, dtype=str(DTYPE), provider=provider, device=str(DEVICE))

    def call():
        fn()
        _sync()

    benchmark.pedantic(call, rounds=50 if T <= 64 else 10, iterations=1, warmup_rounds=3)
