"""The reference operator against hand-written math, and its exactness guarantees.

Every call names ``backend="reference"``: ``finesteer.steer`` defaults to ``"auto"``, which on a
machine with the CPU extension is the fused kernel (tests/test_backends.py compares the two)."""
import functools

import pytest
import torch

import finesteer as fs
from finesteer import reference
from finesteer._constants import FLOAT_DTYPES
from finesteer.bank import SteeringBank
from tests.utils import random_steerer

steer = functools.partial(fs.steer, backend="reference")


def hand_vector(steerer, h):
    """DESIGN §4 written out for one row, straight from the unpacked weights."""
    g, mo = steerer.gate, steerer.mose
    hc = h - g.mu
    score = (g.P.T @ hc).square().sum() / (hc.square().sum() + 1e-6)
    gate = {"off": 1.0, "hard": float(score > g.threshold),
            "soft": torch.sigmoid((score - g.threshold) / steerer.temperature)}[steerer.gate_mode]
    alpha = torch.softmax(mo.R.T @ h + mo.c, 0)
    beta = mo.W2 @ torch.relu(mo.W1 @ h + mo.b1) + mo.b2
    return steerer.strength * gate * (alpha @ mo.V + mo.U @ beta)


@pytest.mark.parametrize("gate_mode", ["off", "hard", "soft"])
def test_token_mode_matches_hand_math(gate_mode):
    s = random_steerer(48, r=3, K=5, H=11, m=2, gate_mode=gate_mode, strength=1.7, seed=3)
    h = torch.randn(9, 48)
    out = steer(h, s)
    expected = torch.stack([row + hand_vector(s, row) for row in h])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_scores_in_unit_interval():
    s = random_steerer(32, r=6)
    h = torch.randn(200, 32) * torch.logspace(-3, 3, 200)[:, None]
    score = s.score(h)
    assert score.min() >= 0 and score.max() <= 1


def test_closed_gate_and_unsteered_rows_are_bit_identical():
    s = random_steerer(64, threshold=2.0)  # scores are ≤ 1: the hard gate never opens
    for dtype in FLOAT_DTYPES:
        h = torch.randn(7, 64).to(dtype)
        h[0, :5] = -0.0  # signed zeros survive too
        out = steer(h, s)
        assert torch.equal(out, h) and torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                                   h.view(torch.int16 if dtype != torch.float32 else torch.int32))
    opened = random_steerer(64, gate_mode="off")
    h = torch.randn(4, 64)
    out = steer(h, [opened, opened], index=torch.tensor([0, -1, 1, -1]))
    assert torch.equal(out[1], h[1]) and torch.equal(out[3], h[3])
    assert not torch.equal(out[0], h[0])


def test_bank_rows_use_their_own_steerer_and_padding_is_exact():
    small = random_steerer(40, r=2, K=2, H=5, m=1, seed=1, gate_mode="soft")
    big = random_steerer(40, r=7, K=6, H=19, m=4, seed=2, gate_mode="off")
    ungated = random_steerer(40, K=3, seed=4, with_gate=False, strength=0.5)
    bank = SteeringBank.from_steerers([small, big, ungated])
    assert (bank.r, bank.K, bank.H, bank.m) == (7, 6, 19, 4)
    h = torch.randn(6, 40)
    index = torch.tensor([2, 0, 1, -1, 1, 0])
    out = steer(h, bank, index=index)
    for t, n in enumerate(index.tolist()):
        expected = h[t] if n < 0 else h[t] + [small, big, ungated][n].vector(h[t])
        torch.testing.assert_close(out[t], expected, atol=1e-5, rtol=1e-5)


def test_index_none_means_steerer_zero():
    a, b = random_steerer(16, seed=1, gate_mode="off"), random_steerer(16, seed=2, gate_mode="off")
    h = torch.randn(3, 16)
    torch.testing.assert_close(steer(h, [a, b]), steer(h, a))


def test_prompt_mode_adds_last_token_vector_everywhere():
    s = random_steerer(24, gate_mode="off", seed=5)
    h = torch.randn(2, 6, 24)
    last = torch.tensor([3, 5])
    out = steer(h, s, mode="prompt", last_index=last)
    for b in range(2):
        v = s.vector(h[b, last[b]])
        torch.testing.assert_close(out[b], h[b] + v, atol=1e-6, rtol=1e-6)
    # a single sequence [S, d] defaults to its last row
    torch.testing.assert_close(steer(h[0], s, mode="prompt"), h[0] + s.vector(h[0, -1]), atol=1e-6, rtol=1e-6)


def test_prompt_mode_bank_index_per_sequence():
    a, b = random_steerer(24, gate_mode="off", seed=1), random_steerer(24, gate_mode="off", seed=2)
    h = torch.randn(3, 4, 24)
    out = steer(h, [a, b], mode="prompt", index=torch.tensor([1, -1, 0]))
    torch.testing.assert_close(out[0], h[0] + b.vector(h[0, -1]), atol=1e-6, rtol=1e-6)
    assert torch.equal(out[1], h[1])
    torch.testing.assert_close(out[2], h[2] + a.vector(h[2, -1]), atol=1e-6, rtol=1e-6)


def test_low_precision_io_rounds_once_from_fp32():
    s = random_steerer(32, gate_mode="off")
    h = torch.randn(5, 32).to(torch.bfloat16)
    out = steer(h, s)
    expected = (h.float() + s.vector(h.float())).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_weight_dtype_bf16_bank_is_close_to_fp32():
    s = random_steerer(64, gate_mode="off")
    h = torch.randn(4, 64)
    out32 = reference.steer_tokens(h, s.bank(), None)
    out16 = reference.steer_tokens(h, s.bank(weight_dtype=torch.bfloat16), None)
    torch.testing.assert_close(out16, out32, atol=5e-2, rtol=5e-2)


def test_input_is_not_modified():
    s = random_steerer(16, gate_mode="off")
    h = torch.randn(3, 16)
    before = h.clone()
    steer(h, s)
    steer(h.view(1, 3, 16), s, mode="prompt")
    assert torch.equal(h, before)


def test_strength_can_change_in_place_on_the_bank():
    s = random_steerer(16, gate_mode="off")
    bank = s.bank()
    h = torch.randn(2, 16)
    v1 = reference.steering_vectors(h, bank, None)
    bank.strength.mul_(3.0)
    torch.testing.assert_close(reference.steering_vectors(h, bank, None), 3 * v1)
