"""Fitting MoSE (DESIGN §3): experts by K-means, a residual basis, and a trained attention router.

The fit returns the inference form :class:`finesteer.mose.MoSE`; the trainable network is
:class:`finesteer.fit.network.MoSENetwork`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..mose import MoSE
from ._validate import as_matrix, check_choice, check_int, check_real, child_generator, holdout_split
from .kmeans import cluster_sums, select_k
from .linalg import principal_directions
from .network import MoSENetwork, row_basis
from .train import train_early_stopping

RESIDUALS = ("all", "prototype_residual")
_WHERE = "fit_mose"
#: K-means restarts per candidate K (best inertia kept).
KMEANS_RESTARTS = 4


def fit_mose(queries, deltas, k_range=(4, 10), residual_dim: int = 10, hidden: int = 256, epochs: int = 200,
             seed: int = 0, lr: float = 1e-3, weight_decay: float = 1e-2, batch_size: int = 64,
             val_fraction: float = 0.1, patience: int = 20, normalize: bool = True, residual: str = "all",
             learned_values: bool = False, attn_dim: Optional[int] = None, pca_dim: Optional[int] = 256,
             progress: bool = True, query_dim: Optional[int] = 512) -> MoSE:
    """Fit a mixture of steering experts from query states ``queries`` [N, d] and targets ``deltas`` [N, d].

    Semantics (DESIGN §3)::

        split      rows into train / validation (val_fraction, seeded); everything below but the
                   early-stopping check uses the training rows only
        experts    K-means (k-means++, KMEANS_RESTARTS restarts) on δ (L2-normalised if ``normalize``)
                   projected on its top-min(pca_dim, N, d) principal components; K ∈ k_range maximises
                   the Calinski–Harabasz index; prototypes C [K, d] = cluster means of the raw δ
        residual   U [d, m] = top-m principal components of centred δ ("all") or of δ with span(C)
                   projected out ("prototype_residual")
        network    on x = Πᵀ(q − mean q)/σ, Π = top-min(query_dim, N − 1, d) principal components of
                   the training queries (the identity when query_dim is None or ≥ d):
                   s(h) = softmax((W_q h + b_q) K_Cᵀ/√d_a) V + U (W_2 relu(W_1 h + b_1) + b_2),
                   K_C = C W_kᵀ + b_k, V = C (or learned C W_vᵀ + b_v); trained by AdamW on
                   MSE(s(q), δ) with early stopping; the best-validation weights are kept
        export     normalisation and Π folded into W_q, b_q, W_1, b_1 (fp64, then fp32);
                   R = W_qᵀ K_Cᵀ/√d_a, c = K_C b_q/√d_a → MoSE(R, c, V, U, W1, b1, W2, b2)

    Fully seeded: the same inputs and ``seed`` give identical tensors, and the global RNG is not
    touched. ``progress`` shows a tqdm bar over epochs.

    Args:
        queries: h at the last prompt token, [N, d]. deltas: δ, [N, d]. Any float dtype/device.
        k_range: (k_min, k_max), 2 ≤ k_min ≤ k_max < training rows.
        residual_dim: m, 1 ≤ m ≤ min(training rows, d).
        hidden: H, hidden size of the residual MLP.
        attn_dim: d_a (default min(d, 128)).
        pca_dim: dimensions of the clustering space (None: cluster in the original space).
        epochs, lr, weight_decay, batch_size, val_fraction, patience: training settings.
        query_dim: input dimensions of the network (see above). The training queries span at most
            N − 1 directions, so this loses little, and it makes training d/query_dim times cheaper
            (d = 4096, N = 1000 fits in well under a minute on 2 cores). None: all d features.
        normalize: L2-normalise δ before clustering (the prototypes are always raw-δ means).
        residual: "all" or "prototype_residual". learned_values: learn V = C W_vᵀ + b_v.

    Returns: :class:`MoSE` with ``prototypes``, ``cluster_sizes``, JSON-serialisable ``fit_stats``
    and ``history`` (per-epoch train/validation MSE).
    """
    return fit_mose_network(queries, deltas, k_range=k_range, residual_dim=residual_dim, hidden=hidden,
                            epochs=epochs, seed=seed, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                            val_fraction=val_fraction, patience=patience, normalize=normalize,
                            residual=residual, learned_values=learned_values, attn_dim=attn_dim,
                            pca_dim=pca_dim, progress=progress, query_dim=query_dim)[0]


def fit_mose_network(queries, deltas, k_range=(4, 10), residual_dim: int = 10, hidden: int = 256,
                     epochs: int = 200, seed: int = 0, lr: float = 1e-3, weight_decay: float = 1e-2,
                     batch_size: int = 64, val_fraction: float = 0.1, patience: int = 20, normalize: bool = True,
                     residual: str = "all", learned_values: bool = False, attn_dim: Optional[int] = None,
                     pca_dim: Optional[int] = 256, progress: bool = True,
                     query_dim: Optional[int] = 512) -> tuple[MoSE, MoSENetwork]:
    """:func:`fit_mose`, also returning the trained :class:`MoSENetwork` (for inspection or
    further training; its output equals the returned MoSE's ``vector`` up to fp32 rounding)."""
    Q = as_matrix(queries, "queries", _WHERE)
    D = as_matrix(deltas, "deltas", _WHERE)
    if Q.shape[0] != D.shape[0]:
        raise ValueError(f"{_WHERE}: queries has {Q.shape[0]} rows but deltas has {D.shape[0]}; need one δ per query")
    if Q.shape[1] != D.shape[1]:
        raise ValueError(f"{_WHERE}: hidden size mismatch: queries has {Q.shape[1]} features, deltas has "
                         f"{D.shape[1]}")
    n, d = D.shape
    k_min, k_max = _check_k_range(k_range)
    hidden = check_int(hidden, "hidden", _WHERE, 1)
    epochs = check_int(epochs, "epochs", _WHERE, 1)
    seed = check_int(seed, "seed", _WHERE, 0)
    batch_size = check_int(batch_size, "batch_size", _WHERE, 1)
    patience = check_int(patience, "patience", _WHERE, 1)
    lr = check_real(lr, "lr", _WHERE, 0.0, math.inf, low_open=True, high_open=True)
    weight_decay = check_real(weight_decay, "weight_decay", _WHERE, 0.0, math.inf, high_open=True)
    val_fraction = check_real(val_fraction, "val_fraction", _WHERE, 0.0, 1.0, low_open=True, high_open=True)
    check_choice(residual, "residual", _WHERE, RESIDUALS)
    attn_dim = min(d, 128) if attn_dim is None else check_int(attn_dim, "attn_dim", _WHERE, 1)
    if pca_dim is not None:
        pca_dim = check_int(pca_dim, "pca_dim", _WHERE, 1)
    if query_dim is not None:
        query_dim = check_int(query_dim, "query_dim", _WHERE, 1)

    train_idx, val_idx = holdout_split(n, val_fraction, child_generator(seed, 0), "queries/deltas", _WHERE)
    n_tr = train_idx.numel()
    if n_tr <= k_max:
        raise ValueError(f"{_WHERE}: {n} rows leave {n_tr} training rows after the validation split "
                         f"(val_fraction={val_fraction}); need more than k_max={k_max} (the Calinski–Harabasz "
                         "index needs N > K)")
    residual_dim = check_int(residual_dim, "residual_dim", _WHERE, 1)
    if residual_dim > min(n_tr, d):
        raise ValueError(f"{_WHERE}: residual_dim={residual_dim} exceeds min(training rows={n_tr}, hidden size={d})")
    q_tr, d_tr = Q[train_idx], D[train_idx]

    # 1. Experts.
    Z, p = _clustering_space(d_tr, normalize, pca_dim)
    if float(Z.square().sum()) <= 0.0:
        raise ValueError(f"{_WHERE}: all deltas rows are identical{' after L2 normalisation' if normalize else ''}; "
                         "there is nothing to cluster into experts")
    clusters, ch = select_k(Z, k_min, k_max, child_generator(seed, 1), n_init=KMEANS_RESTARTS)
    K = clusters.centers.shape[0]
    sizes = clusters.sizes.double()
    C = cluster_sums(d_tr, clusters.labels, K) / sizes[:, None]

    # 2. Residual basis.
    if residual == "all":
        U = principal_directions(d_tr - d_tr.mean(0), residual_dim)
    else:
        Qc = row_basis(C)  # rank-revealing: prototypes may be linearly dependent when K > d
        rest = d_tr - (d_tr @ Qc) @ Qc.T
        U = principal_directions(rest - rest.mean(0), residual_dim)

    # 3.–4. Network and training.
    m_q = q_tr.mean(0)
    centred = q_tr - m_q
    proj = None
    if query_dim is not None and min(query_dim, n_tr - 1) < d:
        proj = principal_directions(centred, min(query_dim, n_tr - 1))
        centred = centred @ proj
    s_q = float(centred.square().mean().sqrt())
    s_d = float(d_tr.square().mean().sqrt())
    net = MoSENetwork(C, U, hidden=hidden, attn_dim=attn_dim, learned_values=bool(learned_values), in_mean=m_q,
                      in_scale=s_q if s_q > 0 else 1.0, out_scale=s_d, generator=child_generator(seed, 2),
                      in_proj=proj)
    # The input normalisation is fixed, so features are computed once, not every step.
    with torch.no_grad():
        x_tr, x_va = net.features(q_tr.float()), net.features(Q[val_idx].float())
    y_va = D[val_idx].float()
    result = train_early_stopping(
        net, _train_loss(net, x_tr, d_tr, fixed_values=not learned_values),
        lambda: (net.forward_features(x_va) - y_va).square().mean(), n_tr, epochs=epochs, lr=lr,
        weight_decay=weight_decay, batch_size=batch_size, patience=patience, generator=child_generator(seed, 3),
        loss_scale=s_d, progress=progress, desc=f"MoSE fit (K={K})")

    # 5. Export.
    baseline = float((y_va - d_tr.mean(0).float()).square().mean())
    stats = {
        "num_experts": K,
        "k_range": [k_min, k_max],
        "ch_scores": {str(k): float(v) for k, v in ch.items()},
        "cluster_sizes": [int(x) for x in clusters.sizes.tolist()],
        "kmeans_inertia": float(clusters.inertia),
        "clustering_dim": p,
        "network_input_dim": d if proj is None else int(proj.shape[1]),
        "n_samples": n,
        "n_train": n_tr,
        "n_val": int(val_idx.numel()),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "train_loss": result.train_loss_at_best,
        "val_loss": result.best_val_loss,
        "val_loss_mean_delta": baseline,
        "seed": seed,
        "hyperparameters": {
            "k_range": [k_min, k_max], "residual_dim": residual_dim, "hidden": hidden, "epochs": epochs,
            "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "val_fraction": val_fraction,
            "patience": patience, "normalize": bool(normalize), "residual": residual,
            "learned_values": bool(learned_values), "attn_dim": attn_dim, "pca_dim": pca_dim,
            "query_dim": query_dim, "kmeans_restarts": KMEANS_RESTARTS,
        },
    }
    mose = net.export(prototypes=C.float().contiguous(), cluster_sizes=sizes.float(), fit_stats=stats,
                      history=result.history)
    return mose, net


def _train_loss(net: MoSENetwork, x: torch.Tensor, deltas: torch.Tensor, fixed_values: bool):
    """``batch_loss(idx)`` = MSE per element of s(q) against δ over the rows ``idx``.

    With fixed values every s(q) = [α ; β] B lies in the row space of B = [V ; Uᵀ] (rank
    r_B ≤ K + m), so with Q_B an orthonormal basis of it
    ‖s − δ‖² = ‖[α ; β] B Q_B − δ Q_B‖² + ‖δ − δ Q_B Q_Bᵀ‖²: the same loss and gradients computed in
    r_B instead of d dimensions (the second term is a constant, kept so the loss is the true MSE).
    Learned values move B, so they use the direct form.
    """
    d = deltas.shape[1]
    if not fixed_values:
        y = deltas.float()
        return lambda idx: (net.forward_features(x[idx]) - y[idx]).square().mean()
    with torch.no_grad():
        B = net.output_basis().double()
    Qb = row_basis(B)
    Bc = (B @ Qb).float()
    yc = deltas @ Qb
    rest = (deltas - yc @ Qb.T).square().sum(1).float()
    yc = yc.float()
    return lambda idx: ((net.coefficients_features(x[idx]) @ Bc - yc[idx]).square().sum(1) + rest[idx]).mean() / d


def _check_k_range(k_range) -> tuple[int, int]:
    try:
        k_min, k_max = k_range
    except (TypeError, ValueError):
        raise ValueError(f"{_WHERE}: k_range must be a pair (k_min, k_max), got {k_range!r}") from None
    k_min = check_int(k_min, "k_range[0] (k_min)", _WHERE, 2)
    k_max = check_int(k_max, "k_range[1] (k_max)", _WHERE, 2)
    if k_min > k_max:
        raise ValueError(f"{_WHERE}: k_range=({k_min}, {k_max}) is empty; need k_min <= k_max")
    return k_min, k_max


def _clustering_space(deltas: torch.Tensor, normalize: bool, pca_dim: Optional[int]):
    """The rows K-means runs on: (optionally L2-normalised) δ, centred and projected on its top
    principal components (distances are kept exactly when pca_dim covers the data's rank)."""
    X = deltas
    if normalize:
        # A zero δ (identical preferred and undesired responses) stays at the origin.
        X = X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)
    X = X - X.mean(0)
    if pca_dim is None:
        return X, X.shape[1]
    p = min(pca_dim, X.shape[0], X.shape[1])
    return X @ principal_directions(X, p), p
