"""fit_scs: subspace, score range, held-out calibration, AUROC, determinism and input errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finesteer import SCSGate
from finesteer.fit import calibration_split, fit_scs, recalibrate_scs
from finesteer.fit.linalg import principal_directions
from finesteer.fit.metrics import auroc, threshold_at_fpr


def scs_data(d: int = 48, n_target: int = 150, n_benign: int = 200, signal: float = 4.0, seed: int = 0):
    """Benign rows: an offset plus a shared low-rank background plus noise. Target rows: the
    same, plus energy in 3 extra directions (``signal`` sets how separable they are)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, 7, generator=g))[0]
    bg, tg = basis[:, :4], basis[:, 4:]
    offset = 3.0 * torch.randn(d, generator=g)

    def rows(n, target):
        x = offset + 2.0 * torch.randn(n, 4, generator=g) @ bg.T + 0.5 * torch.randn(n, d, generator=g)
        if target:
            x = x + signal * torch.randn(n, 3, generator=g) @ tg.T
        return x

    return rows(n_target, True), rows(n_benign, False)


def held_out_scores(gate: SCSGate, target, benign, calib_fraction=0.2, seed=0):
    split = calibration_split(target.shape[0], benign.shape[0], calib_fraction, seed)
    return gate.score(target[split["target"][1]]), gate.score(benign[split["benign"][1]])


@pytest.mark.parametrize("method", ["energy", "contrastive", "discriminant"])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_subspace_is_orthonormal(method, rank):
    target, benign = scs_data()
    gate = fit_scs(target, benign, rank=rank, method=method)
    assert gate.P.dtype == torch.float32 and gate.mu.dtype == torch.float32
    assert gate.P.shape == (48, rank) and gate.mu.shape == (48,)
    assert gate.method == method
    torch.testing.assert_close(gate.P.T @ gate.P, torch.eye(rank), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["energy", "contrastive", "discriminant"])
def test_scores_in_unit_interval(method):
    target, benign = scs_data()
    gate = fit_scs(target, benign, rank=4, method=method)
    g = torch.Generator().manual_seed(5)
    probes = torch.cat([target, benign, 100.0 * torch.randn(50, 48, generator=g), gate.mu[None],
                        gate.mu + 10.0 * gate.P.T])  # on μ, and rows lying entirely in the subspace
    s = gate.score(probes)
    assert bool((s >= 0).all()) and bool((s <= 1.0 + 1e-6).all())
    assert float(s[150 + 200 + 50]) == 0.0                  # h = μ has no energy anywhere
    assert bool((s[-4:] > 1 - 1e-5).all())                  # all of it inside the subspace


@pytest.mark.parametrize("method", ["energy", "contrastive", "discriminant"])
@pytest.mark.parametrize("max_fpr", [0.0, 0.05, 0.2])
def test_calibration_on_held_out_split(method, max_fpr):
    # Overlapping classes, so the threshold is really constrained by the FPR bound.
    target, benign = scs_data(signal=0.8)
    gate = fit_scs(target, benign, rank=3, method=method, max_benign_fpr=max_fpr)
    rep = gate.report
    s_t, s_b = held_out_scores(gate, target, benign)
    assert rep.threshold == gate.threshold
    assert (rep.n_target, rep.n_benign) == (30, 40)
    assert rep.max_benign_fpr == max_fpr
    assert rep.fpr == float((s_b > gate.threshold).double().mean()) <= max_fpr
    assert rep.tpr == float((s_t > gate.threshold).double().mean())
    assert rep.auroc == pytest.approx(_pairwise_auroc(s_t, s_b), abs=1e-12)
    # τ is the smallest allowed threshold: the next lower benign score breaks the bound.
    lower = s_b[s_b < gate.threshold]
    if lower.numel():
        assert float((s_b > lower.max()).double().mean()) > max_fpr


def test_separable_problem_has_auroc_one():
    target, benign = scs_data(signal=6.0)
    gate = fit_scs(target, benign, rank=3)
    assert gate.report.auroc > 0.995
    assert gate.report.tpr > 0.95
    assert gate.report.fpr <= 0.05


def test_contrastive_subspace_avoids_benign_directions():
    target, benign = scs_data(signal=1.5)
    split = calibration_split(150, 200)
    b_fit = benign[split["benign"][0]].double()
    mu = b_fit.mean(0)
    Qb = principal_directions(b_fit - mu, 4)
    gate = fit_scs(target, benign, rank=3, method="contrastive", benign_rank=4)
    assert float((Qb.float().T @ gate.P).abs().max()) < 1e-5
    torch.testing.assert_close(gate.mu, mu.float(), atol=1e-6, rtol=0)
    # The energy gate's top direction is the benign background (it has the most target energy);
    # the contrastive one ignores it and separates better.
    energy = fit_scs(target, benign, rank=3, method="energy")
    assert gate.report.auroc > energy.report.auroc


def test_discriminant_subspace_is_the_generalised_eigenproblem():
    target, benign = scs_data(signal=1.5)
    split = calibration_split(150, 200)
    t_fit, b_fit = target[split["target"][0]].double(), benign[split["benign"][0]].double()
    mu = b_fit.mean(0)
    gate = fit_scs(target, benign, rank=3, method="discriminant")
    # span(P) = span of the top-3 generalised eigenvectors, computed here by scipy-free brute force:
    # eigenvectors of (S_b + ridge)^-1 S_t
    from finesteer.fit.scs import DISCRIMINANT_RIDGE

    St = (t_fit - mu).T @ (t_fit - mu) / t_fit.shape[0]
    Sb = (b_fit - mu).T @ (b_fit - mu) / b_fit.shape[0]
    Sb = Sb + DISCRIMINANT_RIDGE * float(Sb.diagonal().mean()) * torch.eye(48, dtype=Sb.dtype)
    evals, evecs = torch.linalg.eig(torch.linalg.solve(Sb, St))
    W = evecs.real[:, evals.real.argsort(descending=True)[:3]]
    Q = torch.linalg.qr(W)[0]
    P = gate.P.double()
    torch.testing.assert_close(P @ P.T, Q @ Q.T, atol=1e-4, rtol=0)
    # it ignores the benign background that dominates the energy gate, and separates better
    energy = fit_scs(target, benign, rank=3, method="energy")
    assert gate.report.auroc > energy.report.auroc


def test_benign_rank_zero_is_energy():
    target, benign = scs_data()
    a = fit_scs(target, benign, rank=3, method="contrastive", benign_rank=0)
    b = fit_scs(target, benign, rank=3, method="energy")
    torch.testing.assert_close(a.P, b.P, atol=1e-6, rtol=0)


@pytest.mark.parametrize("center", ["benign", "target", "all"])
def test_center_options(center):
    target, benign = scs_data()
    split = calibration_split(150, 200)
    t_fit, b_fit = target[split["target"][0]].double(), benign[split["benign"][0]].double()
    expected = {"benign": b_fit, "target": t_fit, "all": torch.cat([t_fit, b_fit])}[center].mean(0)
    gate = fit_scs(target, benign, rank=3, center=center)
    torch.testing.assert_close(gate.mu, expected.float(), atol=1e-6, rtol=0)


def test_accepts_numpy_and_low_precision_inputs():
    target, benign = scs_data()
    ref = fit_scs(target.double(), benign.double(), rank=3)
    from_numpy = fit_scs(target.double().numpy(), benign.double().numpy(), rank=3)
    assert torch.equal(ref.P, from_numpy.P) and ref.threshold == from_numpy.threshold
    bf16 = fit_scs(target.bfloat16(), benign.bfloat16(), rank=3)
    assert bf16.report.auroc > 0.9


def test_same_seed_same_gate_and_seed_changes_split():
    target, benign = scs_data(signal=0.8)
    a, b = fit_scs(target, benign, seed=3, rank=3), fit_scs(target, benign, seed=3, rank=3)
    assert torch.equal(a.P, b.P) and torch.equal(a.mu, b.mu) and a.report == b.report
    c = fit_scs(target, benign, seed=4, rank=3)
    assert not torch.equal(a.mu, c.mu)


def test_split_sizes():
    split = calibration_split(10, 7, calib_fraction=0.2, seed=0)
    t_fit, t_cal = split["target"]
    assert (t_fit.numel(), t_cal.numel()) == (8, 2)
    assert sorted(torch.cat([t_fit, t_cal]).tolist()) == list(range(10))
    assert split["benign"][1].numel() == 1  # round(1.4) = 1
    assert calibration_split(2, 2, 0.01)["target"][1].numel() == 1  # at least one held out


# --- metrics --------------------------------------------------------------------------------

def _pairwise_auroc(pos, neg):
    p, n = pos.double()[:, None], neg.double()[None, :]
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def test_auroc_counts_ties_half():
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])) == 0.5
    assert auroc(torch.tensor([2.0]), torch.tensor([1.0])) == 1.0
    assert auroc(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randint(0, 6, (37,), generator=g).float(), torch.randint(0, 5, (23,), generator=g).float()
    assert auroc(pos, neg) == pytest.approx(_pairwise_auroc(pos, neg), abs=1e-12)


@pytest.mark.parametrize("max_fpr,allowed", [(0.0, 0), (0.05, 5), (0.29, 29), (0.999, 99), (0.004, 0)])
def test_threshold_at_fpr_allows_floor_fpr_n_false_positives(max_fpr, allowed):
    neg = torch.arange(100, dtype=torch.float32) / 100
    tau = threshold_at_fpr(neg[torch.randperm(100, generator=torch.Generator().manual_seed(0))], max_fpr)
    assert int((neg > tau).sum()) == allowed
    assert math.isclose(tau, float(neg[99 - allowed]))


def test_threshold_with_tied_scores_stays_within_bound():
    neg = torch.tensor([0.1] * 5 + [0.5] * 10 + [0.9] * 5)
    tau = threshold_at_fpr(neg, 0.3)   # 6 allowed, but the 10 tied 0.5s pass or fail together
    assert tau == pytest.approx(0.5) and float((neg > tau).double().mean()) == 0.25


# --- bad input ------------------------------------------------------------------------------

def _good():
    return scs_data(d=16, n_target=20, n_benign=20)


@pytest.mark.parametrize("mutate,match", [
    (lambda t, b: (t[:0], b), "target is empty"),
    (lambda t, b: (t, b[:0]), "benign is empty"),
    (lambda t, b: (t[:, :0], b), "target is empty"),
    (lambda t, b: (t, b[:, :8]), "hidden size mismatch: target has 16 features, benign has 8"),
    (lambda t, b: (t[0], b), r"target must be 2-D \[N, d\]"),
    (lambda t, b: (t.index_put((torch.tensor([3]), torch.tensor([5])), torch.tensor(float("nan"))), b),
     "target contains NaN or Inf .*row 3, column 5"),
    (lambda t, b: (t, b.index_put((torch.tensor([0]), torch.tensor([1])), torch.tensor(float("inf")))),
     "benign contains NaN or Inf"),
    (lambda t, b: (t.double().index_put((torch.tensor([1]), torch.tensor([2])), torch.tensor(1e300, dtype=torch.float64)), b),
     "target has values beyond the fp32 range .*row 1, column 2"),
    (lambda t, b: (t[:1], b), "target has 1 rows, too few to split"),
    (lambda t, b: (t, b[:1]), "benign has 1 rows, too few to split"),
    (lambda t, b: (t.bool(), b), "target must hold real numbers"),
])
def test_bad_data(mutate, match):
    t, b = mutate(*_good())
    with pytest.raises(ValueError, match=match):
        fit_scs(t, b, rank=2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank must be >= 1, got 0"),
    (dict(rank=2.5), "rank must be an integer"),
    (dict(rank=17), r"rank=17 exceeds min\(target fit rows=16, hidden size=16\)"),
    (dict(rank=10, method="contrastive", benign_rank=8), "exceeds the hidden size 16"),
    (dict(rank=2, method="contrastive", benign_rank=17), r"benign_rank=17 exceeds min\(benign fit rows=16"),
    (dict(method="pca"), "unknown method 'pca'"),
    (dict(center="median"), "unknown center 'median'"),
    (dict(calib_fraction=0.0), r"calib_fraction must be in \(0.0, 1.0\)"),
    (dict(calib_fraction=1.0), r"calib_fraction must be in \(0.0, 1.0\)"),
    (dict(calib_fraction=0.99), "target has 20 rows, too few to split"),
    (dict(max_benign_fpr=-0.1), r"max_benign_fpr must be in \[0.0, 1.0\)"),
    (dict(max_benign_fpr=1.0), r"max_benign_fpr must be in \[0.0, 1.0\)"),
    (dict(max_benign_fpr=float("nan")), "max_benign_fpr must be in"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(method="probe", probe_ridge=0.0), r"probe_ridge must be in \(0.0, inf\)"),
])
def test_bad_arguments(kwargs, match):
    t, b = _good()
    with pytest.raises(ValueError, match=match):
        fit_scs(t, b, **kwargs)


def test_rank_limited_by_hidden_size():
    t, b = scs_data(d=8, n_target=100, n_benign=100)
    assert fit_scs(t, b, rank=8).rank == 8
    with pytest.raises(ValueError, match=r"rank=9 exceeds min\(target fit rows=80, hidden size=8\) = 8"):
        fit_scs(t, b, rank=9)


def test_contrastive_without_room_outside_benign_subspace():
    # Target rows that live entirely inside the benign principal subspace.
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 3, generator=g))[0]
    benign = torch.randn(60, 3, generator=g) @ basis.T
    target = 5.0 * torch.randn(60, 3, generator=g) @ basis.T
    gate = fit_scs(target, benign, rank=2, method="contrastive", benign_rank=3)
    # Nothing of the target remains, so the SVD directions are arbitrary; they must still be
    # orthonormal and outside span(benign).
    torch.testing.assert_close(gate.P.T @ gate.P, torch.eye(2), atol=1e-5, rtol=0)
    assert float((basis.T @ gate.P).abs().max()) < 1e-4
    assert np.isfinite(gate.threshold)


# --- the probe gate: a linear probe written in the SCS form -------------------------------------

def probe_data(d: int = 48, n: int = 300, shift: float = 3.0, seed: int = 0):
    """Target and benign rows that differ along one direction only (a mean shift), on top of a
    large constant offset and anisotropic noise, as in LLM residual streams: a probe separates
    them, an energy subspace of the target rows does not single the direction out."""
    fixed = torch.Generator().manual_seed(1234)  # the same "model" for every seed; seed draws rows
    w = torch.nn.functional.normalize(torch.randn(d, generator=fixed), dim=0)
    offset = 40.0 * torch.randn(d, generator=fixed)
    scales = torch.linspace(0.3, 3.0, d)
    g = torch.Generator().manual_seed(seed)

    def rows(k, target):
        return offset + scales * torch.randn(k, d, generator=g) + (shift * w if target else 0.0)

    return rows(n, True), rows(n, False), w


def fisher_direction(target, benign):
    """The probe the gate is meant to reproduce (fp64; same ridge rule as fit_scs)."""
    from finesteer.fit.scs import PROBE_RIDGE
    t, b = target.double(), benign.double()
    ct, cb = t - t.mean(0), b - b.mean(0)
    sw = (ct.T @ ct + cb.T @ cb) / (t.shape[0] + b.shape[0] - 2)
    sw += PROBE_RIDGE * float(sw.diagonal().mean()) * torch.eye(t.shape[1], dtype=sw.dtype)
    w = torch.linalg.solve(sw, t.mean(0) - b.mean(0))
    return w / w.norm()


def test_probe_gate_orders_rows_like_the_linear_probe():
    target, benign, _ = probe_data()
    gate = fit_scs(target, benign, method="probe")
    assert gate.rank == 1 and gate.method == "probe"
    split = calibration_split(target.shape[0], benign.shape[0])
    fisher = fisher_direction(target[split["target"][0]], benign[split["benign"][0]])
    w = gate.P[:, 0].double()
    assert int((w == 0).sum()) == 1                     # the anchor coordinate
    assert float(w @ fisher) > 0.999                    # the probe, up to that one coordinate
    # unseen rows, in and a little beyond the range of the fit rows
    probe_rows = torch.cat(probe_data(seed=1)[:2]) + 0.5 * torch.randn(600, 48, generator=torch.Generator().manual_seed(2))
    a = probe_rows.double() @ w
    s = gate.score(probe_rows).double()
    order_a, order_s = a.argsort(), s.argsort()
    # The same order up to rows whose probe scores are closer than the approximation: the
    # denominator varies by ~2|b|/u ≈ 2·0.3/18000 relative, i.e. ~(a + t)·|b|/u ≈ 3e-4 std of a.
    assert float((a[order_s].diff() < -1e-3 * float(a.std())).double().mean()) == 0.0
    assert float(np.corrcoef(order_a.argsort().numpy(), order_s.argsort().numpy())[0, 1]) > 0.99999
    # and therefore the held-out AUROC of the probe itself (up to a pair of near-ties in 3,600)
    s_t, s_b = held_out_scores(gate, target, benign)
    p_t = target[split["target"][1]].double() @ w
    p_b = benign[split["benign"][1]].double() @ w
    assert abs(gate.report.auroc - auroc(p_t.float(), p_b.float())) <= 2 / (60 * 60)
    assert gate.report.auroc > 0.85


def test_probe_gate_is_one_sided_where_the_energy_gate_is_not():
    # Rows far out on the benign side of the probe direction: a rank-1 energy-type gate along the
    # same direction (sign-blind cos²) opens on them; the probe gate keeps them closed.
    target, benign, w = probe_data()
    gate = fit_scs(target, benign, method="probe")
    mu_b = benign.mean(0)
    far_benign = mu_b - 6.0 * w + 0.1 * torch.randn(20, 48, generator=torch.Generator().manual_seed(3))
    far_target = mu_b + 6.0 * w + 0.1 * torch.randn(20, 48, generator=torch.Generator().manual_seed(4))
    assert bool((gate.score(far_target) > gate.threshold).all())
    assert not bool((gate.score(far_benign) > gate.threshold).any())
    sign_blind = SCSGate(P=gate.P, mu=mu_b, threshold=0.0)
    torch.testing.assert_close(sign_blind.score(far_benign), sign_blind.score(2 * mu_b - far_benign))


def test_probe_gate_rank_and_degenerate_data():
    target, benign, _ = probe_data()
    assert fit_scs(target, benign, method="probe", rank=1).rank == 1
    with pytest.raises(ValueError, match=r"method='probe' is a rank-1 gate by construction; got rank=4"):
        fit_scs(target, benign, method="probe", rank=4)
    with pytest.raises(ValueError, match="same mean"):
        fit_scs(torch.ones(50, 8), torch.ones(60, 8), method="probe")
    assert fit_scs(target, benign).rank == 16  # the subspace methods' default rank


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_gate_decisions_are_the_same_in_every_backend(dtype):
    # The centre lies far from the data; every backend forms h − μ per element in fp32, so the
    # gate decisions match the fp32 score (bf16: up to rows within rounding of τ).
    import finesteer as fs
    from finesteer.mose import MoSE
    target, benign, _ = probe_data()
    gate = fit_scs(target, benign, method="probe", max_benign_fpr=0.2)
    d = target.shape[1]
    mose = MoSE(R=torch.zeros(d, 1), c=torch.zeros(1), V=torch.ones(1, d), U=torch.zeros(d, 1),
                W1=torch.zeros(1, d), b1=torch.zeros(1), W2=torch.zeros(1, 1), b2=torch.zeros(1))
    st = fs.Steerer(gate=gate, mose=mose, layer=0, gate_mode="hard")
    h = torch.cat(probe_data(seed=7)[:2])[::3].to(dtype)
    s = gate.score(h.float())
    clear = (s - gate.threshold).abs() > 1e-3 * float(s.std())
    expected = (s > gate.threshold)
    assert 0.1 < float(expected.float().mean()) < 0.9
    available = [name for name, why in fs.backends().items() if why.startswith("available")]
    assert "reference" in available
    for backend in available:
        out = fs.steer(h, st, backend=backend)
        opened = (out.float() - h.float()).abs().amax(1) > 0
        assert torch.equal(opened[clear], expected[clear]), backend


def test_calibration_report_prints_a_tiny_threshold_readably():
    # probe gates calibrate τ around 1e-7 on real models; a fixed-point format printed it as 0.0000
    from finesteer.gate import CalibrationReport

    text = str(CalibrationReport(threshold=2.835e-7, tpr=0.8, fpr=0.05, auroc=0.9, n_target=10, n_benign=10,
                                 max_benign_fpr=0.05))
    assert "tau=2.835e-07" in text


@pytest.mark.parametrize("method", ["energy", "probe"])
@pytest.mark.parametrize("max_fpr", [0.0, 0.02, 0.3])
def test_recalibrate_moves_only_the_threshold(method, max_fpr):
    """recalibrate_scs keeps P and μ and picks τ on the new rows by fit_scs's rule; its report is
    exactly what the gate does on them."""
    target, benign = scs_data(signal=0.8)
    gate = fit_scs(target, benign, rank=1 if method == "probe" else 3, method=method, max_benign_fpr=0.05)
    new_t, new_b = scs_data(signal=0.8, n_target=60, n_benign=90, seed=7)
    again = recalibrate_scs(gate, new_t.double(), new_b.half(), max_benign_fpr=max_fpr)
    assert again is not gate and again.P is gate.P and again.mu is gate.mu and again.method == method
    assert gate.report.max_benign_fpr == 0.05  # the fitted gate is left as it was
    s_t, s_b = gate.score(new_t.double().float()), gate.score(new_b.half().float())
    assert again.threshold == threshold_at_fpr(s_b, max_fpr) == again.report.threshold
    rep = again.report
    assert (rep.n_target, rep.n_benign, rep.max_benign_fpr) == (60, 90, max_fpr)
    assert rep.fpr == float((s_b > again.threshold).double().mean()) <= max_fpr
    assert rep.tpr == float((s_t > again.threshold).double().mean())
    assert rep.auroc == pytest.approx(_pairwise_auroc(s_t, s_b), abs=1e-12)
    # a looser budget never raises τ
    looser = recalibrate_scs(gate, new_t, new_b, max_benign_fpr=min(0.99, max_fpr + 0.2))
    assert looser.threshold <= again.threshold


def test_recalibrate_refuses_bad_inputs():
    target, benign = scs_data()
    gate = fit_scs(target, benign, rank=2)
    with pytest.raises(ValueError, match="benign has 47 features, the gate's hidden size is 48"):
        recalibrate_scs(gate, target, benign[:, :47])
    with pytest.raises(ValueError, match="max_benign_fpr"):
        recalibrate_scs(gate, target, benign, max_benign_fpr=1.0)
    with pytest.raises(ValueError, match="target is empty"):
        recalibrate_scs(gate, target[:0], benign)
    with pytest.raises(TypeError, match="must be an SCSGate"):
        recalibrate_scs(None, target, benign)
