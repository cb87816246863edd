"""fit_mose: expert selection, export exactness, quality vs the mean difference, determinism, errors."""
from __future__ import annotations

import json

import pytest
import torch

from finesteer import MoSE
from finesteer.fit import MoSENetwork, fit_mose, fit_mose_network
from finesteer.fit._validate import child_generator, holdout_split
from finesteer.fit.kmeans import calinski_harabasz, kmeans, select_k
from finesteer.fit.mose import RIDGE_PENALTIES, _train_loss, ridge_residual

D = 32
FAST = dict(hidden=32, epochs=40, batch_size=128, attn_dim=16, progress=False)


def mixture(n: int, d: int = D, modes: int = 5, seed: int = 0, noise: float = 0.3):
    """δ around ``modes`` orthogonal behaviour directions (norm √d); each query carries a
    mode-specific key, so the mode (and thus δ) is predictable from the query. The mixture
    itself is fixed; ``seed`` draws the rows."""
    g = torch.Generator().manual_seed(1234 + d + modes)
    centers = torch.linalg.qr(torch.randn(d, modes, generator=g))[0].T * d ** 0.5
    keys = 3.0 * torch.randn(modes, d, generator=g)
    offset = 2.0 * torch.randn(d, generator=g)
    g = torch.Generator().manual_seed(seed)
    z = torch.arange(n) % modes
    q = offset + keys[z] + torch.randn(n, d, generator=g)
    delta = centers[z] + noise * torch.randn(n, d, generator=g)
    return q, delta, centers


@pytest.fixture(scope="module")
def fitted():
    q, delta, centers = mixture(300)
    mose, net = fit_mose_network(q, delta, **FAST, k_range=(3, 8))
    return q, delta, centers, mose, net


def test_calinski_harabasz_picks_true_number_of_modes(fitted):
    q, delta, centers, mose, _ = fitted
    fs = mose.fit_stats
    assert fs["num_experts"] == mose.num_experts == 5
    assert sorted(int(k) for k in fs["ch_scores"]) == list(range(3, 9))
    assert max(fs["ch_scores"], key=fs["ch_scores"].get) == "5"
    # The clustering recovers the modes exactly, and the prototypes are the raw-δ means of the
    # training rows of each mode.
    train, _ = holdout_split(300, 0.1, child_generator(0, 0), "rows", "test")
    mode_of_expert = torch.cdist(mose.prototypes, centers).argmin(1)
    assert sorted(mode_of_expert.tolist()) == [0, 1, 2, 3, 4]
    for j, mode in enumerate(mode_of_expert.tolist()):
        rows = train[train % 5 == mode]
        torch.testing.assert_close(mose.prototypes[j], delta[rows].mean(0), atol=1e-5, rtol=0)
        assert int(mose.cluster_sizes[j]) == rows.numel()
    assert torch.equal(mose.V, mose.prototypes)
    assert int(mose.cluster_sizes.sum()) == fs["n_train"] == 270


def test_beats_mean_difference_on_held_out_data(fitted):
    q, delta, _, mose, _ = fitted
    q_new, d_new, _ = mixture(200, seed=1)
    mse = float((mose.vector(q_new) - d_new).square().mean())
    mse_mean = float((delta.mean(0) - d_new).square().mean())
    assert mse < 0.25 * mse_mean
    assert mse < 2.0 * 0.3 ** 2  # close to the noise floor


def test_routing_picks_the_right_expert(fitted):
    q, delta, centers, mose, _ = fitted
    q_new, _, _ = mixture(100, seed=2)
    expert_of_mode = torch.cdist(centers, mose.prototypes).argmin(1)   # [modes]
    chosen = mose.routing(q_new).argmax(1)
    assert torch.equal(chosen, expert_of_mode[torch.arange(100) % 5])


@pytest.mark.parametrize("kwargs", [dict(), dict(learned_values=True), dict(residual="prototype_residual"),
                                    dict(query_dim=6), dict(query_dim=None)])
def test_export_matches_trained_module(kwargs):
    q, delta, _ = mixture(200)
    mose, net = fit_mose_network(q, delta, **{**FAST, "epochs": 15, **kwargs})
    assert isinstance(net, MoSENetwork) and isinstance(mose, MoSE)
    g = torch.Generator().manual_seed(7)
    probes = torch.cat([mixture(50, seed=3)[0], 3.0 * torch.randn(20, D, generator=g)])
    with torch.no_grad():
        alpha, vec = net.routing(probes), net(probes)
    # α from the collapsed R, c (fp32) equals the module's attention; the exported vector equals
    # the module's output.
    torch.testing.assert_close(torch.softmax(probes @ mose.R + mose.c, -1), alpha, atol=1e-5, rtol=0)
    torch.testing.assert_close(mose.routing(probes), alpha, atol=1e-5, rtol=0)
    torch.testing.assert_close(mose.vector(probes), vec, atol=1e-5, rtol=1e-5)
    for name in MoSE.TENSORS:
        t = getattr(mose, name)
        assert t.dtype == torch.float32 and t.is_contiguous() and bool(torch.isfinite(t).all()), name


def test_learned_values_start_at_prototypes():
    q, delta, _ = mixture(100)
    _, net = fit_mose_network(q, delta, **{**FAST, "epochs": 1, "lr": 1e-12, "learned_values": True})
    torch.testing.assert_close(net.values(), net.C, atol=1e-5, rtol=1e-5)


def test_mean_init_starts_at_the_mean_delta():
    q, delta, _ = mixture(100)
    mose, net = fit_mose_network(q, delta, **{**FAST, "epochs": 1, "lr": 1e-12})
    train, _ = holdout_split(100, 0.1, child_generator(0, 0), "rows", "test")
    mean = delta[train].double().mean(0).float()
    for out in (net(q), mose.vector(q)):
        torch.testing.assert_close(out, mean.expand_as(out), atol=1e-4, rtol=1e-4)


def test_mean_init_never_ends_worse_than_the_mean_on_its_validation_rows():
    # δ that the query cannot predict (a constant plus noise): a randomly started network fits
    # the noise of its training rows; the mean-started one keeps the mean vector (best_epoch 0)
    # or something at least as good on the validation rows.
    g = torch.Generator().manual_seed(3)
    q = torch.randn(120, D, generator=g)
    delta = 2.0 + torch.randn(120, D, generator=g)
    opts = {**FAST, "epochs": 30, "lr": 1e-2, "batch_size": 16, "merge_duplicates": False}
    mean_start = fit_mose(q, delta, **opts).fit_stats
    random_start = fit_mose(q, delta, **opts, init="random").fit_stats
    assert mean_start["val_loss"] <= mean_start["val_loss_mean_delta"] * (1 + 1e-6)
    assert random_start["val_loss"] > random_start["val_loss_mean_delta"]
    assert mean_start["val_loss_mean_delta"] == pytest.approx(random_start["val_loss_mean_delta"])


def linear_deltas(n: int, seed: int = 0):
    """δ = a constant + a linear function of the query + small noise: what a ridge read-out fits."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, D, generator=g)
    W = 0.5 * torch.randn(D, D, generator=g)
    delta = 3.0 + q @ W + 0.1 * torch.randn(n, D, generator=g)
    return q, delta


def test_linear_residual_is_written_exactly_into_the_mlp():
    q, delta = linear_deltas(80)
    _, net = fit_mose_network(q, delta, **{**FAST, "epochs": 1, "lr": 1e-12})
    m, p = net.fc2.out_features, net.fc1.in_features
    g = torch.Generator().manual_seed(1)
    A, a = torch.randn(m, p, generator=g), torch.randn(m, generator=g)
    net.set_linear_residual(A, a)
    x = net.features(q)
    beta = net.coefficients_features(x)[:, net.C.shape[0]:]
    torch.testing.assert_close(beta, net.out_scale * (x @ A.T + a), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"weight \[10, 32\]"):
        net.set_linear_residual(A[:, :3], a)


def test_ridge_init_starts_at_the_validation_picked_ridge_read_out_and_never_ends_worse():
    q, delta = linear_deltas(200)
    frozen = {**FAST, "epochs": 1, "lr": 1e-12, "residual_dim": 16}
    ridge = fit_mose(q, delta, **frozen, init="ridge").fit_stats
    mean = fit_mose(q, delta, **frozen).fit_stats
    assert ridge["ridge_penalty"] in RIDGE_PENALTIES
    # the linear read-out of 16 of 32 δ directions removes most of the error the mean vector leaves
    assert ridge["val_mse"] < 0.6 * mean["val_mse"]
    assert ridge["val_cosine"] > mean["val_cosine"]
    trained = fit_mose(q, delta, **{**FAST, "residual_dim": 16, "epochs": 30, "lr": 1e-2}, init="ridge").fit_stats
    assert trained["val_loss"] <= ridge["val_loss"] * (1 + 1e-6)


def test_ridge_read_out_falls_back_to_zero_when_no_penalty_helps():
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(50, 8, generator=g), torch.randn(50, 3, generator=g)
    fit = ridge_residual(x, t, torch.randn(20, 8, generator=g), t.mean(0).expand(20, 3))
    assert fit["penalty"] == float("inf") and fit["val_mse"] == pytest.approx(0.0, abs=1e-12)
    assert not fit["weight"].any()
    torch.testing.assert_close(fit["bias"], t.double().mean(0))


def test_ridge_init_needs_two_hidden_units_per_residual_coefficient():
    q, delta = linear_deltas(60)
    with pytest.raises(ValueError, match=r"hidden=8 < 2·residual_dim=20"):
        fit_mose(q, delta, **{**FAST, "hidden": 8}, init="ridge")


def test_shapes_statistics_and_history(fitted):
    _, _, _, mose, _ = fitted
    K, m, H = 5, 10, 32
    shapes = dict(R=(D, K), c=(K,), V=(K, D), U=(D, m), W1=(H, D), b1=(H,), W2=(m, H), b2=(m,),
                  prototypes=(K, D), cluster_sizes=(K,))
    for name, shape in shapes.items():
        assert tuple(getattr(mose, name).shape) == shape, name
    torch.testing.assert_close(mose.U.T @ mose.U, torch.eye(m), atol=1e-5, rtol=0)
    fs = mose.fit_stats
    json.dumps(fs, allow_nan=False)  # JSON-serialisable, finite
    hist = mose.history
    assert len(hist["train_loss"]) == len(hist["val_loss"]) == fs["epochs_run"]
    assert 1 <= fs["best_epoch"] <= fs["epochs_run"] <= 40
    assert fs["val_loss"] == min(hist["val_loss"]) == hist["val_loss"][fs["best_epoch"] - 1]
    assert fs["val_loss"] < fs["val_loss_mean_delta"]
    assert (fs["n_samples"], fs["n_train"], fs["n_val"], fs["seed"]) == (300, 270, 30, 0)
    assert fs["hyperparameters"]["hidden"] == 32 and fs["network_input_dim"] == D


def test_early_stopping_restores_best_weights():
    q, delta, _ = mixture(200)
    # A large learning rate makes the validation loss bounce, so training stops early.
    mose = fit_mose(q, delta, **{**FAST, "epochs": 200, "patience": 3, "lr": 3e-2, "batch_size": 16})
    fs = mose.fit_stats
    assert fs["stopped_early"] and fs["best_epoch"] < fs["epochs_run"] < 200
    _, val = holdout_split(200, 0.1, child_generator(0, 0), "rows", "test")
    val_mse = float((mose.vector(q[val]) - delta[val]).square().mean())
    assert val_mse == pytest.approx(fs["val_loss"], rel=1e-4)
    assert val_mse < mose.history["val_loss"][-1]


@pytest.mark.parametrize("loss", ["mse", "mse_cosine"])
def test_reduced_loss_equals_direct_loss(loss):
    q, delta, _ = mixture(120)
    _, net = fit_mose_network(q, delta, **{**FAST, "epochs": 2})
    x = net.features(q).detach()
    idx = torch.arange(0, 120, 3)
    losses, grads = [], []
    for fixed in (True, False):
        net.zero_grad()
        loss_value = _train_loss(net, x, delta.double(), fixed_values=fixed, loss=loss, cosine_weight=0.7)(idx)
        loss_value.backward()
        losses.append(loss_value.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    if loss == "mse_cosine":
        with torch.no_grad():
            pred, y = net.forward_features(x[idx]), delta[idx].float()
            cos = torch.nn.functional.cosine_similarity(pred, y, dim=-1)
            want = (pred - y).square().mean() + 0.7 * float(net.out_scale) ** 2 * (1 - cos).mean()
        torch.testing.assert_close(losses[0], want, atol=0, rtol=1e-4)
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_options_object_equals_keywords():
    from finesteer.fit import MoSEOptions

    q, delta, _ = mixture(150)
    opts = MoSEOptions(**{**FAST, "epochs": 3})
    a = fit_mose(q, delta, opts)
    b = fit_mose(q, delta, **{**FAST, "epochs": 3})
    c = fit_mose(q, delta, opts.replace(epochs=1), epochs=3)  # keywords override the object
    for other in (b, c):
        for name in MoSE.TENSORS:
            assert torch.equal(getattr(a, name), getattr(other, name)), name
    assert a.fit_stats["hyperparameters"]["loss"] == "mse"
    with pytest.raises(TypeError, match="unknown option.*hiden"):
        fit_mose(q, delta, hiden=3)
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        fit_mose(q, delta, **FAST, loss="l1")


def test_mse_cosine_loss_fits_and_reports_held_out_cosine():
    q, delta, _ = mixture(200)
    mose = fit_mose(q, delta, **{**FAST, "loss": "mse_cosine"})
    fs = mose.fit_stats
    assert fs["hyperparameters"]["loss"] == "mse_cosine"
    # the mixture's δ is predictable from the query: far better than the mean vector, in both measures
    assert fs["val_cosine"] > 0.9 > fs["val_cosine_mean_delta"]
    assert fs["val_mse"] < 0.2 * fs["val_loss_mean_delta"]


def test_prototype_residual_basis_is_orthogonal_to_prototypes():
    q, delta, _ = mixture(200)
    mose = fit_mose(q, delta, **{**FAST, "epochs": 2, "residual": "prototype_residual", "residual_dim": 4})
    Qc = torch.linalg.qr(mose.prototypes.T)[0]
    assert float((Qc.T @ mose.U).abs().max()) < 1e-5


def test_more_experts_than_hidden_size():
    # K > d: the prototypes are linearly dependent; keys, values and the prototype-residual
    # basis must still be well defined.
    g = torch.Generator().manual_seed(0)
    z = torch.arange(120) % 6
    centers = 3.0 * torch.randn(6, 4, generator=g)
    delta = centers[z] + 0.05 * torch.randn(120, 4, generator=g)
    q = 2.0 * centers[z] + 0.1 * torch.randn(120, 4, generator=g)
    for residual in ("all", "prototype_residual"):
        mose, net = fit_mose_network(q, delta, **{**FAST, "epochs": 3, "k_range": (5, 7), "residual_dim": 2,
                                                  "residual": residual, "normalize": False})
        assert mose.num_experts == 6
        torch.testing.assert_close(mose.U.T @ mose.U, torch.eye(2), atol=1e-5, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(mose.vector(q), net(q), atol=1e-5, rtol=1e-5)


def test_same_seed_identical_and_global_rng_untouched():
    q, delta, _ = mixture(150)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    a = fit_mose(q, delta, **{**FAST, "epochs": 5})
    assert torch.equal(torch.get_rng_state(), state)
    b = fit_mose(q, delta, **{**FAST, "epochs": 5})
    for name in MoSE.TENSORS + ("prototypes", "cluster_sizes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.fit_stats == b.fit_stats and a.history == b.history
    c = fit_mose(q, delta, **{**FAST, "epochs": 5, "seed": 1})
    assert not torch.equal(a.W1, c.W1)


def test_progress_bar(capsys):
    q, delta, _ = mixture(100)
    fit_mose(q, delta, **{**FAST, "epochs": 2, "progress": True})
    assert "MoSE fit" in capsys.readouterr().err
    fit_mose(q, delta, **{**FAST, "epochs": 2, "progress": False})
    assert "MoSE fit" not in capsys.readouterr().err


# --- K-means and Calinski–Harabasz ----------------------------------------------------------

def test_calinski_harabasz_matches_definition():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    labels = torch.arange(40) % 4
    mean = X.mean(0)
    B = sum(int((labels == j).sum()) * float((X[labels == j].mean(0) - mean).square().sum()) for j in range(4))
    W = sum(float((X[labels == j] - X[labels == j].mean(0)).square().sum()) for j in range(4))
    assert calinski_harabasz(X, labels, 4) == pytest.approx((B / 3) / (W / 36), rel=1e-12)


def test_kmeans_finds_blobs_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centers = 10.0 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    X = centers[torch.arange(90) % 3] + 0.1 * torch.randn(90, 4, generator=g, dtype=torch.float64)
    best, scores = select_k(X, 2, 6, torch.Generator().manual_seed(1))
    assert best.centers.shape[0] == 3 and max(scores, key=scores.get) == 3
    assert torch.equal(best.labels, best.labels[torch.arange(90) % 3][torch.arange(90) % 3])
    assert len(set(best.labels.tolist())) == 3
    a = kmeans(X, 4, torch.Generator().manual_seed(5))
    b = kmeans(X, 4, torch.Generator().manual_seed(5))
    assert torch.equal(a.centers, b.centers) and torch.equal(a.labels, b.labels)
    assert bool((a.sizes > 0).all())


def test_kmeans_with_duplicate_rows_keeps_clusters_non_empty():
    X = torch.tensor([[0.0, 0.0]] * 6 + [[1.0, 1.0]] * 2, dtype=torch.float64)
    res = kmeans(X, 3, torch.Generator().manual_seed(0))
    assert bool((res.sizes > 0).all()) and int(res.sizes.sum()) == 8


# --- bad input ------------------------------------------------------------------------------

def _good(n=60, d=16):
    q, delta, _ = mixture(n, d=d, modes=4)
    return q, delta


@pytest.mark.parametrize("mutate,match", [
    (lambda q, dl: (q[:-1], dl), "queries has 59 rows but deltas has 60"),
    (lambda q, dl: (q, dl[:, :4]), "hidden size mismatch: queries has 16 features, deltas has 4"),
    (lambda q, dl: (q[:0], dl[:0]), "queries is empty"),
    (lambda q, dl: (q, dl[:, :0]), "deltas is empty"),
    (lambda q, dl: (q.index_put((torch.tensor([2]), torch.tensor([1])), torch.tensor(float("nan"))), dl),
     "queries contains NaN or Inf .*row 2, column 1"),
    (lambda q, dl: (q, dl.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("-inf")))),
     "deltas contains NaN or Inf"),
    (lambda q, dl: (q[:10], dl[:10]), "10 rows leave 9 training rows .* need more than k_max=10"),
    (lambda q, dl: (q[:1], dl[:1]), "1 rows, too few to split"),
    (lambda q, dl: (q, torch.ones_like(dl)), "all deltas rows are identical"),
    (lambda q, dl: (q[None], dl), r"queries must be 2-D"),
])
def test_bad_data(mutate, match):
    q, dl = mutate(*_good())
    with pytest.raises(ValueError, match=match):
        fit_mose(q, dl, **FAST)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k_range=(1, 5)), r"k_range\[0\] \(k_min\) must be >= 2"),
    (dict(k_range=(6, 4)), r"k_range=\(6, 4\) is empty"),
    (dict(k_range=(4,)), "k_range must be a pair"),
    (dict(k_range=4), "k_range must be a pair"),
    (dict(k_range=(4, 6.5)), r"k_range\[1\] \(k_max\) must be an integer"),
    (dict(residual_dim=17), r"residual_dim=17 exceeds min\(training rows=54, hidden size=16\)"),
    (dict(residual_dim=0), "residual_dim must be >= 1"),
    (dict(residual="pca"), "unknown residual 'pca'"),
    (dict(init="zeros"), "unknown init 'zeros'"),
    (dict(val_fraction=0.0), r"val_fraction must be in \(0.0, 1.0\)"),
    (dict(val_fraction=1.0), r"val_fraction must be in \(0.0, 1.0\)"),
    (dict(lr=0.0), r"lr must be in \(0.0, inf\)"),
    (dict(weight_decay=-1.0), r"weight_decay must be in \[0.0, inf\)"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(hidden=0), "hidden must be >= 1"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(patience=0), "patience must be >= 1"),
    (dict(attn_dim=0), "attn_dim must be >= 1"),
    (dict(pca_dim=0), "pca_dim must be >= 1"),
    (dict(query_dim=0), "query_dim must be >= 1"),
    (dict(seed=True), "seed must be an integer"),
    (dict(shrink="yes"), "unknown shrink 'yes'"),
    (dict(cluster_on="answers"), "unknown cluster_on 'answers'"),
    (dict(shrink="cv", shrink_folds=1), "shrink_folds must be >= 2"),
    (dict(shrink="cv", shrink_folds=60), "shrink_folds=60 exceeds the 54 training rows"),
    (dict(shrink="cv", k_range=(4, 40)), "shrink='cv' refits MoSE on 4 of 5 folds .* fold 0 failed: .*need more than "
                                         "k_max=40"),
    (dict(stopping="early"), "unknown stopping 'early'"),
    (dict(stopping="cv", stopping_folds=1), "stopping_folds must be >= 2"),
    (dict(stopping="cv", stopping_folds=61), "stopping_folds=61 exceeds the 60 rows"),
    (dict(stopping="cv", k_range=(4, 50)), "stopping='cv' fits MoSE on 4 of 5 folds of the 60 rows; the fit without "
                                           "fold 0 failed: 48 rows are left without it; need more than k_max=50"),
    (dict(stopping="cv", k_range=(4, 60)), "60 rows; need more than k_max=60"),
    (dict(stopping="cv", init="ridge"), "init='ridge' picks its penalty on the validation rows"),
])
def test_bad_arguments(kwargs, match):
    q, dl = _good()
    with pytest.raises(ValueError, match=match):
        fit_mose(q, dl, **{**FAST, **kwargs})


def test_duplicate_queries_are_merged_into_their_mean_delta():
    from finesteer.fit.mose import merge_duplicate_queries

    q, delta, _ = mixture(120)
    # CAA-style data: every prompt twice, each time with a different response pair (δ ± noise that
    # the query cannot predict); the second copy carries float-rounding noise of another batch
    noise = torch.randn(120, D, generator=torch.Generator().manual_seed(5))
    q2 = torch.cat([q, q * (1 + 1e-7)])
    d2 = torch.cat([delta + noise, delta - noise])
    mq, md = merge_duplicate_queries(q2.double(), d2.double())
    assert mq.shape == (120, D)
    torch.testing.assert_close(mq, q.double())
    torch.testing.assert_close(md, delta.double(), atol=1e-6, rtol=0)
    # exact copies: the fit is the fit on the merged rows. The plain fit is given the very δ means
    # the merge computes (fp64), not a mean taken in fp32: AdamW turns rounding-level differences in
    # its inputs into steps of size ~lr on weights whose gradient is ~0, which made a looser
    # comparison depend on the machine's rounding.
    merged = fit_mose(torch.cat([q, q]), d2, **{**FAST, "epochs": 3})
    _, d_mean = merge_duplicate_queries(torch.cat([q, q]).double(), d2.double())
    plain = fit_mose(q, d_mean, **{**FAST, "epochs": 3})
    torch.testing.assert_close(merged.vector(q), plain.vector(q), atol=0, rtol=0)
    for name in ("V", "U", "W1", "W2"):
        torch.testing.assert_close(getattr(merged, name), getattr(plain, name), atol=0, rtol=0)
    assert merged.fit_stats["n_rows"] == 240 and merged.fit_stats["n_samples"] == 120
    # distinct queries are left alone; merging can be switched off
    assert merge_duplicate_queries(q.double(), delta.double())[0].shape[0] == 120
    assert fit_mose(q2, d2, **{**FAST, "epochs": 1, "merge_duplicates": False}).fit_stats["n_samples"] == 240


def test_choose_null_rows_is_a_seeded_choice_and_checks_its_count():
    from finesteer.fit import choose_null_rows

    a = choose_null_rows(50, 12, seed=3)
    assert a.dtype == torch.long and a.shape == (12,) and torch.equal(a, a.sort().values)
    assert len(set(a.tolist())) == 12 and 0 <= int(a.min()) and int(a.max()) < 50
    assert torch.equal(a, choose_null_rows(50, 12, seed=3)) and not torch.equal(a, choose_null_rows(50, 12, seed=4))
    assert choose_null_rows(50, 0).numel() == 0 and torch.equal(choose_null_rows(5, 5), torch.arange(5))
    with pytest.raises(ValueError, match="6 null rows asked for, but there are only 5 benign prompts"):
        choose_null_rows(5, 6)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="n must be an integer >= 0"):
            choose_null_rows(5, bad)


def test_null_rows_make_the_vector_shrink_on_benign_like_queries():
    """Targets from two modes plus benign queries with δ = 0 (null rows): the fitted vector keeps
    most of its size on held-out target queries and shrinks on held-out benign ones."""
    q, delta, _ = mixture(240, modes=2, seed=0)
    g = torch.Generator().manual_seed(7)
    benign_key = 3.0 * torch.randn(D, generator=g)
    benign = benign_key + torch.randn(240, D, generator=g)
    mose = fit_mose(torch.cat([q, benign]), torch.cat([delta, torch.zeros_like(benign)]), **FAST, k_range=(2, 4))
    q_new, delta_new, _ = mixture(60, modes=2, seed=1)
    benign_new = benign_key + torch.randn(60, D, generator=g)
    on_targets = mose.vector(q_new).norm(dim=1).mean() / delta_new.norm(dim=1).mean()
    on_benign = mose.vector(benign_new).norm(dim=1).mean() / delta_new.norm(dim=1).mean()
    assert on_targets > 0.7 and on_benign < 0.2, (float(on_targets), float(on_benign))


@pytest.mark.parametrize("kwargs", [dict(), dict(learned_values=True)])
def test_shrink_toward_is_exact_in_the_module_and_the_export(kwargs):
    q, delta, _ = mixture(120)
    mose, net = fit_mose_network(q, delta, **{**FAST, "epochs": 10, **kwargs})
    probes = mixture(30, seed=5)[0]
    with torch.no_grad():
        trained = net(probes)
    anchor = torch.randn(D, generator=torch.Generator().manual_seed(2))
    net.shrink_toward(0.3, anchor)
    with torch.no_grad():
        shrunk = net(probes)
    torch.testing.assert_close(shrunk, anchor + 0.3 * (trained - anchor), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(net.export().vector(probes), shrunk, atol=1e-4, rtol=1e-5)
    # the unshrunk export is what fit_mose returned
    torch.testing.assert_close(mose.vector(probes), trained, atol=1e-5, rtol=1e-5)
    for bad, match in ((1.5, r"weight must be in \[0, 1\]"), (-0.1, r"weight must be in \[0, 1\]")):
        with pytest.raises(ValueError, match=match):
            net.shrink_toward(bad, anchor)
    with pytest.raises(ValueError, match=r"anchor must have shape \[32\]"):
        net.shrink_toward(0.5, anchor[:3])


def test_cv_shrinkage_keeps_a_predictable_fit_and_drops_noise():
    """Where the query predicts δ (the mixture) the cross-validated weight keeps the fit (≈ 1); where
    it does not (a constant plus noise), the weight is small and the vector field sits near the mean
    δ (a randomly started fit, which fits its training rows' noise, so that there is something to
    drop); either way the chosen weight's out-of-fold MSE is the lowest of w, 1 and 0."""
    opts = {**FAST, "epochs": 30, "k_range": (3, 6), "shrink": "cv"}
    q, delta, _ = mixture(200)
    kept = fit_mose(q, delta, **opts).fit_stats["shrink"]
    g = torch.Generator().manual_seed(3)
    qn = torch.randn(200, D, generator=g)
    noise = 2.0 + torch.randn(200, D, generator=g)
    noisy = {**opts, "lr": 1e-2, "batch_size": 16, "init": "random"}
    mose = fit_mose(qn, noise, **noisy)
    dropped = mose.fit_stats["shrink"]
    assert kept["weight"] > 0.9 and dropped["weight"] < 0.5, (kept, dropped)
    for st in (kept, dropped):
        assert st["folds"] == 5 and st["cv_mse"] <= min(st["cv_mse_trained"], st["cv_mse_mean"]) + 1e-9
    assert dropped["cv_mse_trained"] > dropped["cv_mse_mean"]
    spread = (mose.vector(qn) - mose.vector(qn).mean(0)).norm(dim=1).mean()
    unshrunk = fit_mose(qn, noise, **{**noisy, "shrink": "off"})
    assert spread < 0.5 * (unshrunk.vector(qn) - unshrunk.vector(qn).mean(0)).norm(dim=1).mean()
    # shrink="off" is the fit as before: the same tensors as a fit that never heard of it
    base = fit_mose(q, delta, **{**opts, "shrink": "off"})
    again = fit_mose(q, delta, **{k: v for k, v in opts.items() if k != "shrink"})
    for name in MoSE.TENSORS:
        assert torch.equal(getattr(base, name), getattr(again, name)), name


def test_query_clustered_experts_are_mean_deltas_of_query_groups():
    """cluster_on="query": K-means runs on the centred queries, so with queries in three groups and
    δ = a group-specific shift plus per-row noise, the experts are exactly the three groups' mean δ
    over the training rows."""
    g = torch.Generator().manual_seed(5)
    groups, n = 3, 300
    keys = 6.0 * torch.randn(groups, D, generator=g)
    shifts = 4.0 * torch.randn(groups, D, generator=g)
    z = torch.arange(n) % groups
    q = 10.0 + keys[z] + torch.randn(n, D, generator=g)
    delta = shifts[z] + 8.0 * torch.randn(n, D, generator=g)
    opts = {**FAST, "k_range": (3, 3), "val_fraction": 0.2}
    mose = fit_mose(q, delta, **opts, cluster_on="query")
    train_idx, _ = holdout_split(n, 0.2, child_generator(0, 0), "", "")
    zt, dt = z[train_idx], delta[train_idx].double()
    expected = torch.stack([dt[zt == k].mean(0) for k in range(groups)]).float()
    got = mose.prototypes
    order = torch.cdist(expected, got).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(got[order], expected, rtol=1e-5, atol=1e-4)
    assert sorted(mose.cluster_sizes.tolist()) == sorted(torch.bincount(zt).float().tolist())
    assert mose.fit_stats["hyperparameters"]["cluster_on"] == "query"
    # one prompt state for every row leaves nothing to cluster; fit_experts needs the queries
    with pytest.raises(ValueError, match="all queries rows are identical after L2 normalisation"):
        fit_mose(torch.ones(n, D), delta, **opts, cluster_on="query", merge_duplicates=False)
    from finesteer.fit.mose import MoSEOptions, fit_experts
    with pytest.raises(ValueError, match="cluster_on='query' needs the training queries"):
        fit_experts(delta.double(), MoSEOptions(cluster_on="query").validated(D))


def test_option_from_text_parses_each_field_by_its_type():
    from finesteer.fit.mose import option_from_text

    assert option_from_text("k_range=3,7") == ("k_range", (3, 7))
    assert option_from_text("learned_values=true") == ("learned_values", True)
    assert option_from_text("weight_decay=0.5") == ("weight_decay", 0.5)
    assert option_from_text("hidden=64") == ("hidden", 64)
    assert option_from_text("query_dim=none") == ("query_dim", None)
    assert option_from_text("attn_dim=16") == ("attn_dim", 16)
    assert option_from_text("shrink=cv") == ("shrink", "cv")
    assert option_from_text("cluster_on=query") == ("cluster_on", "query")
    assert option_from_text("stopping=cv") == ("stopping", "cv")
    for bad, match in (("nonsense=1", "NAME one of .*shrink"), ("hidden", "expected NAME=VALUE"),
                       ("hidden=x", "hidden: cannot parse 'x'"), ("normalize=maybe", "normalize: cannot parse")):
        with pytest.raises(ValueError, match=match):
            option_from_text(bad)


def test_cv_stopping_trains_every_row_for_the_epochs_the_folds_choose():
    """stopping="cv": the epoch count is the argmin of the pooled out-of-fold curve, the network
    trains on every row (no validation split) for exactly that many epochs, the held-out figures are
    out of fold over all rows, and the fit is seeded like the holdout one."""
    from finesteer.fit.mose import MoSEOptions, _build, train_epochs

    q, delta, _ = mixture(200)
    opts = {**FAST, "k_range": (3, 6), "stopping": "cv"}
    mose = fit_mose(q, delta, **opts)
    st = mose.fit_stats
    cv = st["stopping"]
    curve = cv["val_loss_curve"]
    assert cv["folds"] == 5 and st["n_train"] == 200 and st["n_val"] == 0
    assert st["best_epoch"] == cv["epochs"] == min(range(len(curve)), key=curve.__getitem__)  # curve[0]: epoch 0
    assert st["val_loss"] == pytest.approx(min(curve)) and st["epochs_run"] == len(curve) - 1
    assert int(mose.cluster_sizes.sum()) == 200
    # the query predicts δ here: out of fold, MoSE beats each fold's mean vector
    assert st["val_cosine"] > st["val_cosine_mean_delta"] + 0.1 and st["val_mse"] < 0.5 * st["val_loss_mean_delta"]
    # the final network is steps 1-3 on all rows plus that many epochs: rebuilt here, the same tensors
    o = MoSEOptions(**opts).validated(D)
    experts, _, net = _build(q.double(), delta.double(), o)
    train_epochs(net, q.double(), delta.double(), o, cv["epochs"])
    again = net.export(prototypes=experts.prototypes.float().contiguous(), cluster_sizes=experts.sizes.float())
    for name in MoSE.TENSORS:
        assert torch.equal(getattr(again, name), getattr(mose, name)), name
    twice = fit_mose(q, delta, **opts)
    for name in MoSE.TENSORS:
        assert torch.equal(getattr(twice, name), getattr(mose, name)), name
    assert st["hyperparameters"]["stopping"] == "cv" and st["hyperparameters"]["stopping_folds"] == 5



@pytest.mark.parametrize("stopping", ["holdout", "cv"])
def test_a_diverging_fit_names_the_epoch_and_asks_for_a_lower_lr(stopping):
    q, delta, _ = mixture(120)
    with pytest.raises(RuntimeError, match=r"training diverged at epoch 1 \(train loss .*, val loss nan\); lower lr"):
        fit_mose(q, delta, **{**FAST, "lr": 1e38, "k_range": (3, 5), "init": "random", "stopping": stopping})
