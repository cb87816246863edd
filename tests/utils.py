"""Shared test helpers: random steerers, the one bank factory, the one index generator, the one
near-threshold strategy, the one tolerance table, and the one backend-vs-reference check."""
from __future__ import annotations

from typing import Optional

import torch

from finesteer import MoSE, SCSGate, Steerer, SteeringBank, reference
from finesteer._constants import GATE_EPS, GATE_HARD

#: Start of a ``python -c`` script that imports finesteer from the folder given as ``sys.argv[1]``
#: (a source tree, or a build's lib folder) and not through this environment's editable install.
FROM_FOLDER_PRELUDE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in "
                       "type(f).__name__ and 'Editable' not in getattr(f, '__name__', '')]; "
                       "sys.path.insert(0, sys.argv[1]); ")

#: Tolerances (atol, rtol) of a kernel's output against the fp32 reference, per I/O dtype.
#: fp32 differs only by summation order; bf16/fp16 by one rounding of the output element
#: (the reference also rounds once), plus summation-order noise that can flip a rounding.
#: Steering vectors are fp32 whatever the I/O dtype (computed from exactly upcast values), so
#: they always use the fp32 row.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def random_steerer(d: int, r: int = 4, K: int = 3, H: int = 16, m: int = 2, *, seed: int = 0,
                   gate_mode: str | None = "hard", threshold: float | None = None, strength: float = 1.0,
                   temperature: float = 0.05, layer: int = 0, with_gate: bool = True) -> Steerer:
    """A steerer with random (but well-scaled) weights. ``threshold=None`` puts τ at the median
    score of standard-normal inputs, so about half of random rows pass a hard gate."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    gate = None
    if with_gate:
        P, _ = torch.linalg.qr(rn(d, r))
        mu = rn(d, scale=0.1)
        if threshold is None:
            probe = rn(256, d)
            hc = probe - mu
            threshold = float(((hc @ P).square().sum(-1) / hc.square().sum(-1)).median())
        gate = SCSGate(P=P, mu=mu, threshold=threshold)
    mose = MoSE(R=rn(d, K, scale=d ** -0.5), c=rn(K, scale=0.1), V=rn(K, d), U=rn(d, m, scale=d ** -0.5),
                W1=rn(H, d, scale=d ** -0.5), b1=rn(H, scale=0.1), W2=rn(m, H, scale=H ** -0.5), b2=rn(m, scale=0.1))
    return Steerer(gate=gate, mose=mose, strength=strength, layer=layer,
                   gate_mode=gate_mode if with_gate else "off", temperature=temperature)


#: The default bank: three steerers of *different* odd sizes, so every kind of padding is
#: exercised, one per gate mode (hard, soft, none).
DEFAULT_SPECS = (dict(r=3, K=5, H=37, m=3, gate_mode="hard"),
                 dict(r=6, K=2, H=20, m=1, gate_mode="soft", temperature=0.01),
                 dict(r=2, K=3, H=17, m=2, with_gate=False))


def make_bank(d: int, specs=DEFAULT_SPECS, *, weight_dtype=torch.float32, seed: int = 0, device="cpu",
              strength: float = 1.0) -> SteeringBank:
    """A bank of ``len(specs)`` random steerers (``specs``: keyword arguments of :func:`random_steerer`;
    ``r`` is capped at ``d``)."""
    steerers = [random_steerer(d, seed=seed + i, strength=strength, **{**spec, "r": min(spec.get("r", 4), d)})
                for i, spec in enumerate(specs)]
    return SteeringBank.from_steerers(steerers, device=device, weight_dtype=weight_dtype)


def bank_index(T: int, N: int, *, seed: int = 0, dtype=torch.int64, device="cpu") -> torch.Tensor:
    """A bank index of ``T`` rows that uses every steerer ``0..N−1`` and −1 equally often
    (the cyclic pattern 0, 1, …, N−1, −1, shuffled by ``seed`` so neighbouring rows differ)."""
    cyclic = torch.arange(T) % (N + 1)
    cyclic = torch.where(cyclic == N, -1, cyclic)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    return cyclic[perm].to(dtype=dtype, device=device)


def random_h(T: int, d: int, dtype=torch.float32, *, seed: int = 0, device="cpu", scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return (torch.randn(T, d, generator=g) * scale).to(dtype).to(device)


def scores64(h: torch.Tensor, bank, n: int) -> torch.Tensor:
    """SCS scores of every row of ``h`` for steerer ``n``, in fp64 from the values the kernels read."""
    P = bank.A[n, :, :bank.r].double().cpu()
    hc = h.double().cpu() - bank.mu[n].double().cpu()
    return (hc @ P).square().sum(-1) / (hc.square().sum(-1) + GATE_EPS)


def separate_thresholds(bank, h: torch.Tensor, index: Optional[torch.Tensor]) -> None:
    """The near-threshold strategy of every test: move each hard-gated steerer's τ (in place) into
    the widest gap between the scores of the rows that use it, near their median.

    A row whose score lies within float rounding of τ may legitimately be gated differently by two
    summation orders. After this no score is within ~1e-4·τ of τ, usually about half of the rows
    are gated off and half on (all on where the scores have no clear gap), and every row can be
    compared — none is excluded."""
    for n in range(bank.num_steerers):
        if int(bank.gate_mode[n]) != GATE_HARD:
            continue
        rows = torch.ones(h.shape[0], dtype=torch.bool) if index is None else (index.cpu() == n)
        s = scores64(h, bank, n)[rows].sort().values
        if s.numel() == 0:
            continue
        if s.numel() == 1:
            tau = float(s[0]) * (0.5 if n % 2 == 0 else 2.0)
        else:
            lo, hi = s.numel() // 4, max(s.numel() // 4 + 1, (3 * s.numel()) // 4)
            gaps = s[lo + 1:hi + 1] - s[lo:hi]
            j = int(gaps.argmax())
            tau = float(s[lo + j] + s[lo + j + 1]) / 2
            if float(gaps[j]) <= 2e-4 * tau:
                # No clear gap in the middle (e.g. d = r: every score is ~1): open the gate for
                # every row, by a wide margin, rather than compare coin flips.
                tau = float(s[0]) / 2 if float(s[0]) > 0 else -1.0
        bank.threshold[n] = tau


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = ""):
    """``torch.testing.assert_close`` that also prints the first mismatching indices."""
    a, e = actual.float().cpu(), expected.float().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = (a - e).abs().max().item()
        raise AssertionError(f"{what}: {int(bad.sum())}/{a.numel()} elements differ (max abs err {worst:.3g}); "
                             f"first at {idx}: got {[a[tuple(i)].item() for i in idx]}, "
                             f"expected {[e[tuple(i)].item() for i in idx]}")


def check_against_reference(backend, h: torch.Tensor, bank, index: Optional[torch.Tensor], what: str = "") -> torch.Tensor:
    """``backend``'s ``steering_vectors`` and ``steer_tokens`` against :mod:`finesteer.reference`.

    First separates the hard thresholds from the rows' scores (:func:`separate_thresholds`), then
    checks: vectors within the fp32 tolerance, the same rows gated off, outputs within ``h``'s
    dtype tolerance, and rows the reference leaves unsteered returned bit-identical.
    ``backend`` is anything with the two entry points (a backend, or a wrapper that fixes launch
    options). Returns the mask of unsteered rows."""
    separate_thresholds(bank, h, index)
    what = f"{what} T={h.shape[0]} d={h.shape[1]} {h.dtype} w={bank.weight_dtype}"

    vec = backend.steering_vectors(h, bank, index)
    vec_ref = reference.steering_vectors(h, bank, index)
    assert vec.dtype == torch.float32 and vec.shape == h.shape and vec.device == h.device, what
    assert_close_verbose(vec, vec_ref, *TOLERANCES[torch.float32], what=what + " steering_vectors")
    closed = (vec_ref == 0).all(-1)
    assert torch.equal((vec == 0).all(-1), closed), f"{what}: gate decisions differ"

    out = backend.steer_tokens(h, bank, index)
    out_ref = reference.steer_tokens(h, bank, index)
    assert out.dtype == h.dtype and out.shape == h.shape and out.device == h.device, what
    assert_close_verbose(out, out_ref, *TOLERANCES[h.dtype], what=what + " steer_tokens")
    assert torch.equal(out[closed], h[closed]), f"{what}: closed-gate / unsteered rows are not bit-identical"
    return closed
