"""Shared test helpers: random steerers, per-dtype tolerances, a verbose comparison."""
from __future__ import annotations

import torch

from finesteer import MoSE, SCSGate, Steerer
from finesteer import reference
from finesteer._constants import GATE_EPS, GATE_HARD

#: Tolerances (atol, rtol) of a kernel's output against the fp32 reference, per I/O dtype.
#: fp32 differs only by summation order; bf16/fp16 by one rounding of the output element
#: (the reference also rounds once), plus summation-order noise that can flip a rounding.
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


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = ""):
    """``torch.testing.assert_close`` that also prints the first mismatching indices."""
    a, e = actual.float(), expected.float()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = (a - e).abs().max().item()
        raise AssertionError(f"{what}: {int(bad.sum())}/{a.numel()} elements differ (max abs err {worst:.3g}); "
                             f"first at {idx}: got {[a[tuple(i)].item() for i in idx]}, "
                             f"expected {[e[tuple(i)].item() for i in idx]}")


#: A hard-gated row whose score lies within this distance of τ may legitimately be gated
#: differently by two summation orders; comparisons exclude exactly those rows.
GATE_MARGIN = 1e-4


def decided_rows(h: torch.Tensor, bank, index, margin: float = GATE_MARGIN) -> torch.Tensor:
    """Rows whose hard-gate decision is not within ``margin`` of τ (scores computed in fp64)."""
    h64 = h.double()
    keep = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    for n in range(bank.num_steerers):
        if int(bank.gate_mode[n]) != GATE_HARD:
            continue
        P = bank.A[n, :, :bank.r].double()
        hc = h64 - bank.mu[n].double()
        score = (hc @ P).square().sum(-1) / (hc.square().sum(-1) + GATE_EPS)
        near = (score - float(bank.threshold[n])).abs() < margin
        uses = torch.ones_like(keep) if index is None else (index == n)
        keep &= ~(near & uses)
    return keep


def check_backend_against_reference(backend, h: torch.Tensor, bank, index, what: str = "") -> torch.Tensor:
    """``backend``'s token mode and steering vectors against :mod:`finesteer.reference` on the
    decided rows (returned). Outputs use ``h``'s dtype tolerance; the vectors are fp32 whatever
    ``h``'s dtype (h converts exactly), so they use the fp32 tolerance."""
    keep = decided_rows(h, bank, index)
    out = backend.steer_tokens(h, bank, index)
    exp = reference.steer_tokens(h, bank, index)
    assert out.dtype == h.dtype and out.shape == h.shape and out.device == h.device
    assert_close_verbose(out[keep], exp[keep], *TOLERANCES[h.dtype], f"steer_tokens {what}")
    vec = backend.steering_vectors(h, bank, index)
    vexp = reference.steering_vectors(h, bank, index)
    assert vec.dtype == torch.float32
    assert_close_verbose(vec[keep], vexp[keep], *TOLERANCES[torch.float32], f"steering_vectors {what}")
    return keep
