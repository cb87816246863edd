"""The steerer artifact: round trip, and every way a file can be unusable (DESIGN §6)."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import finesteer as fs
from finesteer import ArtifactError, Steerer
from finesteer._constants import FORMAT_VERSION
from tests.utils import random_steerer


def _rewrite(src, dst, tensors=None, meta=None):
    """Copy artifact ``src`` to ``dst`` with some tensors / metadata fields replaced."""
    with safe_open(str(src), framework="pt") as f:
        all_tensors = {k: f.get_tensor(k) for k in f.keys()}
        doc = json.loads(f.metadata()["finesteer"])
    all_tensors.update(tensors or {})
    doc.update(meta or {})
    save_file(all_tensors, str(dst), metadata={"finesteer": json.dumps(doc)})
    return dst


@pytest.fixture
def saved(tmp_path):
    s = random_steerer(24, r=3, K=4, H=9, m=2, strength=2.5, layer=3, gate_mode="soft", temperature=0.1)
    path = tmp_path / "s.safetensors"
    s.save(path, model_name_or_path="tiny-llama")
    return s, path


def test_round_trip_is_exact(saved):
    s, path = saved
    loaded = Steerer.load(path)
    assert (loaded.layer, loaded.strength, loaded.gate_mode, loaded.temperature) == (3, 2.5, "soft", 0.1)
    assert loaded.gate.threshold == s.gate.threshold
    for name in ("P", "mu"):
        assert torch.equal(getattr(loaded.gate, name), getattr(s.gate, name))
    for name in fs.MoSE.TENSORS:
        assert torch.equal(getattr(loaded.mose, name), getattr(s.mose, name))
    # Tensors are bit-equal above; the vectors may differ in the last bit only because the
    # original P (from a QR) is strided while the loaded one is contiguous (another BLAS path).
    h = torch.randn(5, 24)
    torch.testing.assert_close(loaded.vector(h), s.vector(h), atol=1e-6, rtol=1e-6)
    meta = fs.read_metadata(path)
    assert meta["format_version"] == FORMAT_VERSION and meta["hidden_size"] == 24
    assert meta["model_name_or_path"] == "tiny-llama" and meta["package_version"] == fs.__version__


def test_same_steerer_same_bytes(tmp_path):
    s = random_steerer(16)
    s.save(tmp_path / "a.safetensors")
    s.save(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_ungated_steerer_round_trip(tmp_path):
    s = random_steerer(16, with_gate=False)
    s.save(tmp_path / "u.safetensors")
    loaded = Steerer.load(tmp_path / "u.safetensors")
    assert loaded.gate is None and loaded.gate_mode == "off"


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        Steerer.load(tmp_path / "nope.safetensors")


def test_truncated_file(saved, tmp_path):
    _, path = saved
    cut = tmp_path / "cut.safetensors"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"cut\.safetensors.*truncated or corrupt"):
        Steerer.load(cut)


def test_not_a_finesteer_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ArtifactError, match="not a FineSteer artifact"):
        Steerer.load(path)


def test_future_format_version(saved, tmp_path):
    _, path = saved
    bad = _rewrite(path, tmp_path / "future.safetensors", meta={"format_version": FORMAT_VERSION + 1})
    with pytest.raises(ArtifactError, match=r"future\.safetensors: field 'format_version'.*newer"):
        Steerer.load(bad)


def test_wrong_tensor_shape(saved, tmp_path):
    _, path = saved
    bad = _rewrite(path, tmp_path / "shape.safetensors", tensors={"V": torch.zeros(4, 23)})
    with pytest.raises(ArtifactError, match=r"field 'V': shape \(4, 23\).*\(4, 24\)"):
        Steerer.load(bad)


def test_missing_tensor(saved, tmp_path):
    _, path = saved
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "W2"}
        meta = f.metadata()
    bad = tmp_path / "missing.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ArtifactError, match="field 'W2': required tensor is missing"):
        Steerer.load(bad)


def test_non_finite_tensor(saved, tmp_path):
    _, path = saved
    b1 = torch.zeros(9)
    b1[4] = float("nan")
    bad = _rewrite(path, tmp_path / "nan.safetensors", tensors={"b1": b1})
    with pytest.raises(ArtifactError, match="field 'b1': contains NaN or Inf"):
        Steerer.load(bad)


def test_hidden_size_of_model_is_checked(saved):
    _, path = saved
    with pytest.raises(ArtifactError, match="hidden size 24, the model has 32"):
        Steerer.load(path, hidden_size=32)


def test_refuses_to_save_non_finite(tmp_path):
    s = random_steerer(8)
    s.mose.b2[0] = float("inf")
    with pytest.raises(ArtifactError, match="field 'b2'"):
        s.save(tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_save_is_atomic(saved, monkeypatch):
    """A save that fails half-way leaves the previous file untouched and no temporary file behind."""
    s, path = saved
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        random_steerer(24, seed=7).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.parametrize("key,value", [("strength", float("nan")), ("strength", float("inf")),
                                       ("strength", "2"), ("temperature", float("-inf")), ("temperature", 0.0)])
def test_non_finite_or_bad_hyperparameter_is_named(saved, tmp_path, key, value):
    _, path = saved
    with safe_open(str(path), framework="pt") as f:
        hp = json.loads(f.metadata()["finesteer"])["hyperparameters"]
    hp[key] = value
    bad = _rewrite(path, tmp_path / "bad.safetensors", meta={"hyperparameters": hp})
    with pytest.raises(ArtifactError, match=rf"bad\.safetensors: field 'hyperparameters\.{key}'"):
        Steerer.load(bad)


def test_directory_given_as_an_artifact_says_so(tmp_path):
    with pytest.raises(ArtifactError, match="is a directory, not a steerer file"):
        Steerer.load(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a directory; give the path of a file"):
        random_steerer(16).save(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_artifact_gets_ordinary_file_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        random_steerer(16).save(tmp_path / "s.safetensors")
        os.umask(0o077)
        random_steerer(16).save(tmp_path / "private.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "s.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.safetensors").stat().st_mode) == 0o600
