"""The CPU kernel's scheduling (csrc/cpu/steer_cpu.cpp, "threading"): decode-sized calls run on
the calling thread, larger ones split the work across threads; both agree with the reference.

The serial/parallel boundary is kSerialWork = 2^21 multiply-adds of phase 1 (steered rows × d × J,
J = r + K + H). Shapes here sit on both sides of it with a realistic H = 256, so the d-split and
its reduction are exercised (the small-H sweeps in test_cpu.py stay below the boundary).
"""
from __future__ import annotations

import pytest
import torch

from finesteer import SteeringBank
from finesteer.fused import cpu

from .utils import check_backend_against_reference, random_steerer

OK, REASON = cpu.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"cpu backend unavailable: {REASON}")

SERIAL_WORK = 1 << 21  # mirrors kSerialWork in steer_cpu.cpp


@pytest.fixture
def threads():
    """Set torch's intra-op thread count for one test, restoring it afterwards."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def bank_of(d, H=256, modes=("soft",)):
    steerers = [random_steerer(d, r=16, K=8, H=H, m=10, seed=7 + i, gate_mode=mode) for i, mode in enumerate(modes)]
    return SteeringBank.from_steerers(steerers)


def work(bank, rows):
    return rows * bank.hidden_size * bank.A.shape[-1]


@pytest.mark.parametrize("T", [1, 2, 4, 8, 9, 17])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_both_sides_of_the_serial_threshold_match_the_reference(T, n_threads, threads):
    threads(n_threads)
    bank = bank_of(2048)
    h = torch.randn(T, 2048, generator=torch.Generator().manual_seed(T))
    check_backend_against_reference(cpu, h, bank, None, f"T={T} threads={n_threads}")


def test_shapes_cover_both_paths():
    bank = bank_of(2048)
    assert work(bank, 1) < SERIAL_WORK <= work(bank, 4)


def test_mixed_steerers_and_unsteered_rows_in_a_parallel_call(threads):
    threads(2)
    bank = bank_of(2048, modes=("soft", "off", "hard"))
    T = 12
    h = torch.randn(T, 2048, generator=torch.Generator().manual_seed(3))
    index = torch.tensor([0, -1, 1, 2, 0, 0, -1, 1, 2, 2, 0, 1])
    assert work(bank, int((index >= 0).sum())) >= SERIAL_WORK
    check_backend_against_reference(cpu, h, bank, index, "mixed index, 2 threads")
    vec = cpu.steering_vectors(h, bank, index)
    assert torch.equal(vec[index < 0], torch.zeros(2, 2048))


@pytest.mark.parametrize("T", [1, 2])
def test_decode_calls_do_not_depend_on_the_thread_count(T, threads):
    """Below the threshold the call runs on one thread whatever torch's setting, so the result is
    bit-identical with 1 and 2 threads (a d-split across threads would change the summation order)."""
    bank = bank_of(2048)
    assert work(bank, T) < SERIAL_WORK
    h = torch.randn(T, 2048, generator=torch.Generator().manual_seed(11))
    threads(1)
    one = cpu.steer_tokens(h, bank, None), cpu.steering_vectors(h, bank, None)
    threads(2)
    two = cpu.steer_tokens(h, bank, None), cpu.steering_vectors(h, bank, None)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("T", [1, 40, 300])
def test_add_vectors_serial_and_parallel(T, threads):
    threads(2)
    d = 2048
    g = torch.Generator().manual_seed(T)
    h = torch.randn(T, d, generator=g)
    vectors = torch.randn(5, d, generator=g)
    slot = torch.randint(-1, 5, (T,), generator=g)
    out = cpu.add_vectors(h, vectors, slot)
    expected = torch.where((slot >= 0)[:, None], h + vectors[slot.clamp(min=0)], h)
    assert torch.equal(out, expected)
