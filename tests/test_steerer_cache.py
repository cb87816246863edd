"""The packed-bank cache on a Steerer: ``steer(h, steerer)`` and ``Steerer.apply`` pack once, and
any change the bank depends on re-packs it (the result always equals a freshly packed bank)."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

import finesteer
from finesteer import MoSE, SteeringBank, reference
from tests.utils import random_steerer

D = 24


@pytest.fixture
def count_packs(monkeypatch):
    """Counts SteeringBank.from_steerers calls (the packing the cache avoids)."""
    calls = []
    original = SteeringBank.from_steerers.__func__

    def counting(cls, steerers, *args, **kwargs):
        calls.append(len(list(steerers)))
        return original(cls, steerers, *args, **kwargs)

    monkeypatch.setattr(SteeringBank, "from_steerers", classmethod(counting))
    return calls


def fresh(h, steerer):
    """The expected output: the reference on a bank packed right now, bypassing the cache."""
    return reference.steer_tokens(h, steerer.bank(), None)


def test_steer_packs_once_per_steerer(count_packs):
    st = random_steerer(D, seed=1, gate_mode="soft")
    h = torch.randn(5, D)
    first = finesteer.steer(h, st)
    for _ in range(3):
        assert torch.equal(finesteer.steer(h, st), first)
        assert torch.equal(st.apply(h), first)
    assert count_packs == [1]
    assert st.packed_bank("cpu") is st.packed_bank(torch.device("cpu")) is st.packed_bank()


def test_cache_is_per_device_and_weight_dtype(count_packs):
    st = random_steerer(D, seed=2)
    b32 = st.packed_bank("cpu")
    b16 = st.packed_bank("cpu", weight_dtype=torch.bfloat16)
    assert b16 is not b32 and b16.weight_dtype == torch.bfloat16 and b32.weight_dtype == torch.float32
    assert st.packed_bank("cpu", weight_dtype=torch.bfloat16) is b16
    assert len(count_packs) == 2


@pytest.mark.parametrize("change", [
    "strength", "gate_mode", "temperature", "threshold", "mose_inplace", "gate_inplace", "mose_replaced",
    "gate_replaced",
])
def test_any_change_repacks(change, count_packs):
    st = random_steerer(D, seed=3, gate_mode="soft", strength=1.0)
    h = torch.randn(7, D)
    before = finesteer.steer(h, st)
    bank = st.packed_bank("cpu")
    if change == "strength":
        st.strength = 2.5
    elif change == "gate_mode":
        st.gate_mode = "off"
    elif change == "temperature":
        st.temperature = 0.5
    elif change == "threshold":
        st.gate.threshold = 0.0
    elif change == "mose_inplace":
        st.mose.W1.mul_(3.0)  # an in-place edit bumps the tensor's version counter
    elif change == "gate_inplace":
        st.gate.mu.add_(1.0)
    elif change == "mose_replaced":
        st.mose.V = st.mose.V * -1.0
    elif change == "gate_replaced":
        other = random_steerer(D, seed=99)
        st.gate = other.gate
    after = finesteer.steer(h, st)
    assert st.packed_bank("cpu") is not bank
    assert torch.equal(after, fresh(h, st))
    assert not torch.equal(after, before)
    assert torch.equal(finesteer.steer(h, st), after) and len(count_packs) == 3  # fresh() packs once too


@pytest.mark.parametrize("owner,name", [("mose", n) for n in MoSE.TENSORS] + [("gate", "P"), ("gate", "mu")])
def test_in_place_edit_of_every_packed_tensor_repacks(owner, name):
    """Every tensor the bank is packed from is watched (MoSE.TENSORS and the gate's P, μ)."""
    st = random_steerer(D, seed=8, gate_mode="off" if owner == "mose" else "soft")
    bank = st.packed_bank("cpu")
    getattr(getattr(st, owner), name).mul_(1.5)
    assert st.packed_bank("cpu") is not bank
    h = torch.randn(4, D)
    assert torch.equal(finesteer.steer(h, st), fresh(h, st))


def test_unchanged_values_reassigned_do_not_repack(count_packs):
    st = random_steerer(D, seed=4)
    bank = st.packed_bank("cpu")
    st.strength = float(st.strength)
    st.gate_mode = str(st.gate_mode)
    assert st.packed_bank("cpu") is bank and len(count_packs) == 1


def test_invalidate_and_copies_do_not_share_the_cache():
    st = random_steerer(D, seed=5)
    bank = st.packed_bank("cpu")
    dup = copy.deepcopy(st)
    assert "_packed" not in dup.__dict__
    assert "_packed" not in pickle.loads(pickle.dumps(st)).__dict__
    dup.strength = 3.0
    assert st.packed_bank("cpu") is bank  # the original is untouched by its copy
    st.invalidate_packed()
    assert st.packed_bank("cpu") is not bank


def test_cpu_backend_public_call_uses_the_cache(count_packs):
    ok, reason = finesteer._backends._load("cpu")[0] is not None, finesteer.backends()["cpu"]
    if not ok:
        pytest.skip(f"cpu backend unavailable: {reason}")
    st = random_steerer(D, seed=6, gate_mode="soft")
    h = torch.randn(3, D)
    out = finesteer.steer(h, st, backend="cpu")
    out2 = st.apply(h, backend="cpu")
    assert torch.equal(out, out2) and count_packs == [1]
    torch.testing.assert_close(out, fresh(h, st), atol=1e-5, rtol=1e-5)
