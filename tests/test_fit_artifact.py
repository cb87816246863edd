"""Fitted steerers are reproducible artifacts: same seed → same tensors → byte-identical files,
and save → load gives back exactly what was fitted."""
from __future__ import annotations

import pytest
import torch

from finesteer import MoSE, Steerer, load_steerer, read_metadata
from finesteer.fit import fit_mose, fit_scs

from .test_fit_mose import FAST, mixture
from .test_fit_scs import scs_data

D = 32


def fit_steerer(seed: int = 0) -> Steerer:
    target, benign = scs_data(d=D, n_target=80, n_benign=100, seed=11)
    q, delta, _ = mixture(150, d=D)
    gate = fit_scs(target, benign, rank=4, seed=seed)
    mose = fit_mose(q, delta, **{**FAST, "epochs": 8, "k_range": (3, 6), "seed": seed})
    return Steerer(gate=gate, mose=mose, strength=2.0, layer=3)


@pytest.fixture(scope="module")
def fitted_pair():
    return fit_steerer(0), fit_steerer(0)


def _tensors(st: Steerer) -> dict:
    out = {name: getattr(st.mose, name) for name in MoSE.TENSORS + ("prototypes", "cluster_sizes")}
    out.update(P=st.gate.P, mu=st.gate.mu)
    return out


def test_same_seed_gives_identical_tensors(fitted_pair):
    a, b = fitted_pair
    ta, tb = _tensors(a), _tensors(b)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert a.gate.threshold == b.gate.threshold and a.gate.report == b.gate.report
    assert a.mose.fit_stats == b.mose.fit_stats


def test_same_fit_saves_byte_identical_files(fitted_pair, tmp_path):
    a, b = fitted_pair
    a.save(tmp_path / "a1.safetensors")
    a.save(tmp_path / "a2.safetensors")
    b.save(tmp_path / "b.safetensors")
    raw = (tmp_path / "a1.safetensors").read_bytes()
    assert raw == (tmp_path / "a2.safetensors").read_bytes()
    assert raw == (tmp_path / "b.safetensors").read_bytes()


def test_different_seed_gives_a_different_file(fitted_pair, tmp_path):
    a, _ = fitted_pair
    a.save(tmp_path / "a.safetensors")
    fit_steerer(1).save(tmp_path / "c.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() != (tmp_path / "c.safetensors").read_bytes()


def test_save_load_round_trip_is_exact(fitted_pair, tmp_path):
    a, _ = fitted_pair
    path = tmp_path / "steerer.safetensors"
    a.save(path)
    back = load_steerer(path, hidden_size=D)
    ta, tb = _tensors(a), _tensors(back)
    for name in ta:
        assert tb[name].dtype == torch.float32 and torch.equal(ta[name], tb[name]), name
    assert back.gate.threshold == a.gate.threshold
    assert back.gate.method == a.gate.method == "energy"
    assert back.gate.report == a.gate.report
    assert back.mose.fit_stats == a.mose.fit_stats
    assert (back.layer, back.strength, back.gate_mode) == (3, 2.0, "hard")
    meta = read_metadata(path)
    assert meta["fit"]["seed"] == 0 and meta["fit"]["num_experts"] == a.mose.num_experts
    assert meta["calibration"]["auroc"] == a.gate.report.auroc
    h = torch.cat([mixture(40, d=D, seed=5)[0], scs_data(d=D, n_target=20, n_benign=20, seed=11)[0]])
    assert torch.equal(back.vector(h), a.vector(h))
    assert torch.equal(back.gate_value(h), a.gate_value(h))
