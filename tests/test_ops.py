"""The public functional `steer`: argument checking and backend selection."""
import pytest
import torch

import finesteer as fs
from finesteer import _backends
from tests.utils import random_steerer


@pytest.fixture
def steerer():
    return random_steerer(32, gate_mode="off")


def test_hidden_size_mismatch_is_named(steerer):
    with pytest.raises(ValueError, match="hidden size mismatch.*fitted for hidden size 32"):
        fs.steer(torch.randn(2, 31), steerer)


def test_integer_hidden_states_are_rejected(steerer):
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        fs.steer(torch.ones(2, 32, dtype=torch.int64), steerer)


def test_unknown_mode(steerer):
    with pytest.raises(ValueError, match="mode must be 'token' or 'prompt'"):
        fs.steer(torch.randn(2, 32), steerer, mode="sequence")


@pytest.mark.parametrize("index, err, msg", [
    (torch.tensor([0, 2]), IndexError, r"\[-1, 1\]"),
    (torch.tensor([-2, 0]), IndexError, r"\[-1, 1\]"),
    (torch.tensor([0, 1, 0]), ValueError, "shape"),
    (torch.tensor([0.0, 1.0]), TypeError, "int32/int64"),
])
def test_bad_index(steerer, index, err, msg):
    with pytest.raises(err, match=msg):
        fs.steer(torch.randn(2, 32), [steerer, steerer], index=index)


def test_prompt_mode_shape_checks(steerer):
    with pytest.raises(ValueError, match=r"\[S, d\] or \[B, S, d\]"):
        fs.steer(torch.randn(2, 2, 2, 32), steerer, mode="prompt")
    with pytest.raises(IndexError, match="last_index"):
        fs.steer(torch.randn(2, 4, 32), steerer, mode="prompt", last_index=torch.tensor([1, 4]))


def test_token_mode_accepts_per_sequence_index_for_3d(steerer):
    other = random_steerer(32, seed=9, gate_mode="off")
    h = torch.randn(2, 3, 32)
    out = fs.steer(h, [steerer, other], index=torch.tensor([1, -1]), backend="reference")
    torch.testing.assert_close(out[0], h[0] + other.vector(h[0]), atol=1e-6, rtol=1e-6)
    assert torch.equal(out[1], h[1])


def test_wrong_steerer_type():
    with pytest.raises(TypeError, match="Steerer"):
        fs.steer(torch.randn(2, 4), object())


def test_backends_lists_every_backend_with_a_reason():
    listing = fs.backends()
    assert set(listing) == {"reference", "cpu", "triton", "cuda"}
    assert listing["reference"].startswith("available")
    for why in listing.values():
        assert why.split(":", 1)[1].strip()


def test_unknown_backend_is_an_error(steerer):
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        fs.steer(torch.randn(2, 32), steerer, backend="nope")


def test_env_var_overrides_auto(monkeypatch, steerer):
    monkeypatch.setenv(_backends.ENV_VAR, "reference")
    assert _backends.get_backend("auto", torch.device("cpu")).NAME == "reference"
    monkeypatch.setenv(_backends.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="unknown backend"):
        _backends.get_backend("auto", torch.device("cpu"))


def test_explicit_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.setitem(_backends._cache, "cuda", (None, "no CUDA device"))
    with pytest.raises(RuntimeError, match="'cuda' is unavailable: no CUDA device"):
        _backends.get_backend("cuda", torch.device("cpu"))


def test_auto_skips_unavailable_backends(monkeypatch):
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    monkeypatch.setitem(_backends._cache, "cpu", (None, "no compiler"))
    assert _backends.get_backend("auto", torch.device("cpu")).NAME == "reference"


def test_auto_on_cpu_gives_same_result_as_reference(monkeypatch, steerer):
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    h = torch.randn(5, 32)
    torch.testing.assert_close(fs.steer(h, steerer), fs.steer(h, steerer, backend="reference"), atol=1e-5, rtol=1e-5)


def test_every_entry_point_defaults_to_auto():
    """fs.steer, Steerer.apply and the three operator entry points all default to backend="auto"."""
    import inspect

    for fn in (fs.steer, fs.Steerer.apply, fs.ops.steer_tokens, fs.ops.steering_vectors, fs.ops.add_vectors):
        assert inspect.signature(fn).parameters["backend"].default == "auto", fn.__qualname__


def test_default_backend_is_the_auto_choice(monkeypatch, steerer):
    """Calls without ``backend`` go where ``auto`` goes (here forced by the environment variable)."""
    calls = []
    ref = _backends.get_backend("reference", torch.device("cpu"))
    spy = type("Spy", (), {"NAME": "spy", "supports": staticmethod(lambda device: True),
                           "steer_tokens": staticmethod(lambda h, bank, index: calls.append("t") or
                                                        ref.steer_tokens(h, bank, index))})
    monkeypatch.setitem(_backends.BACKEND_MODULES, "spy", "unused")
    monkeypatch.setitem(_backends._cache, "spy", (spy, "test double"))
    monkeypatch.setenv(_backends.ENV_VAR, "spy")
    h = torch.randn(3, 32)
    fs.steer(h, steerer)
    steerer.apply(h)
    assert calls == ["t", "t"]
