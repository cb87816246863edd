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
