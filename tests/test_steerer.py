"""Steerer construction checks and its convenience methods."""
import pytest
import torch

from finesteer import Steerer
from tests.utils import random_steerer


def test_needs_a_mose():
    with pytest.raises(ValueError, match="needs a fitted MoSE"):
        Steerer(gate=random_steerer(8).gate)


def test_gate_mode_needs_a_gate():
    mose = random_steerer(8).mose
    with pytest.raises(ValueError, match="needs an SCS gate"):
        Steerer(mose=mose, gate_mode="hard")
    assert Steerer(mose=mose).gate_mode == "off"


def test_unknown_gate_mode():
    s = random_steerer(8)
    with pytest.raises(ValueError, match="gate_mode must be one of"):
        Steerer(gate=s.gate, mose=s.mose, gate_mode="sometimes")


def test_gate_and_mose_hidden_sizes_must_agree():
    with pytest.raises(ValueError, match="gate hidden size 8 != MoSE hidden size 16"):
        Steerer(gate=random_steerer(8).gate, mose=random_steerer(16).mose)


def test_bad_temperature_and_layer():
    s = random_steerer(8)
    with pytest.raises(ValueError, match="temperature"):
        Steerer(gate=s.gate, mose=s.mose, temperature=0)
    with pytest.raises(ValueError, match="layer"):
        Steerer(gate=s.gate, mose=s.mose, layer=-1)


def test_apply_equals_h_plus_vector():
    s = random_steerer(16, gate_mode="soft")
    h = torch.randn(4, 16)
    torch.testing.assert_close(s.apply(h), h + s.vector(h), atol=1e-6, rtol=1e-6)


def test_score_of_wrong_width_is_named():
    with pytest.raises(ValueError, match="SCSGate.score: hidden size mismatch"):
        random_steerer(16).score(torch.randn(2, 15))


@pytest.mark.parametrize("gate_mode, with_gate", [("hard", True), ("soft", True), ("off", True), ("off", False)])
@pytest.mark.parametrize("shape", [(40, 24), (2, 20, 24)])
def test_vector_equals_the_reference_operator(gate_mode, with_gate, shape):
    """Steerer.vector (gate.score + MoSE.vector on the unpacked weights, used by the CLI and the
    demo) is the operator of finesteer.reference on the packed bank, row for row."""
    from finesteer import reference
    from tests.utils import TOLERANCES, assert_close_verbose, separate_thresholds

    s = random_steerer(24, r=3, K=4, H=9, m=2, seed=7, gate_mode=gate_mode, with_gate=with_gate, strength=1.3)
    h = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 2
    rows = h.reshape(-1, 24)
    bank = s.bank()
    separate_thresholds(bank, rows, None)
    if s.gate is not None:
        s.gate.threshold = float(bank.threshold[0])  # the same separated τ on both sides
    expected = reference.steering_vectors(rows, bank, None).reshape(h.shape)
    got = s.vector(h)
    assert got.shape == h.shape and got.dtype == torch.float32
    assert_close_verbose(got, expected, *TOLERANCES[torch.float32], "Steerer.vector vs reference")
    closed = (expected == 0).all(-1)
    assert torch.equal((got == 0).all(-1), closed)
    if gate_mode == "hard":
        assert bool(closed.any()) and not bool(closed.all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), torch.tensor(float("nan"))])
def test_non_finite_strength_is_refused_at_construction_and_assignment(bad):
    s = random_steerer(8)
    with pytest.raises(ValueError, match="strength must be a finite number"):
        Steerer(gate=s.gate, mose=s.mose, strength=bad)
    with pytest.raises(ValueError, match="strength must be a finite number"):
        s.strength = bad
    assert s.strength == 1.0  # unchanged by the refused assignment


@pytest.mark.parametrize("bad", ["2", None, True, torch.ones(2)])
def test_strength_must_be_one_real_number(bad):
    s = random_steerer(8)
    with pytest.raises(TypeError, match="strength must be a"):
        Steerer(gate=s.gate, mose=s.mose, strength=bad)


def test_strength_accepts_ints_zero_and_negative_values():
    s = random_steerer(8)
    for value, want in ((2, 2.0), (0, 0.0), (-1.5, -1.5), (torch.tensor(0.5), 0.5)):
        s.strength = value
        assert s.strength == want and isinstance(s.strength, float)


def test_mose_repr_is_short():
    mose = random_steerer(256, K=5, H=64, m=3).mose
    mose.fit_stats = {"best_epoch": 17, "val_loss": 0.0123456, "ch_scores": {str(k): 1.0 for k in range(2, 11)}}
    mose.history = {"train_loss": [0.1] * 500, "val_loss": [0.1] * 500}
    mose.cluster_sizes = torch.tensor([3.0, 4.0, 5.0, 6.0, 7.0])
    text = repr(mose)
    assert text == "MoSE(d=256, K=5, m=3, H=64, cluster_sizes=[3, 4, 5, 6, 7], best_epoch=17, val_loss=0.01235)"
    assert str(mose) == text
