"""Fitting MoSE (DESIGN §3): experts by K-means, a residual basis, and a trained attention router.

The fit is four steps, each a function of its own, driven by one :class:`MoSEOptions`:

1. :func:`fit_experts` — K-means prototypes ``C`` with K chosen by the Calinski–Harabasz index;
2. :func:`residual_basis` — ``U``, the top principal directions of δ (or of what ``C`` leaves);
3. :func:`build_network` — the :class:`~finesteer.fit.network.MoSENetwork` with its fixed input
   and output normalisation;
4. :func:`train_network` — AdamW with early stopping on the validation rows (or, with
   ``stopping="cv"``, :func:`cv_epochs` then :func:`train_epochs` on every row).

:func:`fit_mose` runs them and returns the inference form :class:`finesteer.mose.MoSE`;
:func:`fit_mose_network` also returns the trained network.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..mose import MoSE
from ._validate import as_matrix, check_choice, check_int, check_real, child_generator, holdout_split
from .kmeans import cluster_sums, select_k
from .linalg import principal_directions
from .network import MoSENetwork, row_basis
from .train import EpochTrainer, TrainResult, check_finite, train_early_stopping

__all__ = ["CLUSTER_ON", "INITS", "LOSSES", "MoSEOptions", "RESIDUALS", "RIDGE_PENALTIES", "SHRINKS", "STOPPINGS",
           "build_network", "cv_epochs", "cv_shrinkage", "fit_experts", "fit_mose", "fit_mose_network", "merge_duplicate_queries", "option_from_text", "residual_basis",
           "ridge_residual", "train_network"]

RESIDUALS = ("all", "prototype_residual")
LOSSES = ("mse", "mse_cosine")
INITS = ("mean", "ridge", "random")
SHRINKS = ("off", "cv")
CLUSTER_ON = ("delta", "query")
STOPPINGS = ("holdout", "cv")
#: Ridge penalties ``init="ridge"`` tries, as multiples of the training features' mean squared
#: singular value (so the grid means the same on any scale); the validation rows pick one.
RIDGE_PENALTIES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
_WHERE = "fit_mose"
#: K-means restarts per candidate K (best inertia kept).
KMEANS_RESTARTS = 4


@dataclass(frozen=True)
class MoSEOptions:
    """Every setting of the MoSE fit, in one place (see :func:`fit_mose` for the semantics).

    Experts: ``k_range`` (k_min, k_max), 2 ≤ k_min ≤ k_max < training rows; ``cluster_on``
    ``"delta"`` (default: K-means on the training δ, so each expert is a kind of response shift) or
    ``"query"`` (K-means on the centred training queries, each expert the mean δ of one group of
    similar queries: experts the router can tell apart from the query by construction, each an
    average over its group, so answer-wording noise in single δ rows averages out); ``normalize``
    (L2-normalise the clustered rows, after centring for queries); ``pca_dim`` (dimensions of the
    clustering space; None: the original space). Residual: ``residual_dim`` m (1 ≤ m ≤
    min(training rows, d)); ``residual`` ``"all"`` or ``"prototype_residual"``. Network: ``hidden``
    H; ``attn_dim`` d_a (None: min(d, 128)); ``learned_values``; ``query_dim`` (input dimensions:
    the network reads the top principal components of the training queries; None: all d features).
    Training: ``epochs``, ``lr``, ``weight_decay``, ``batch_size``, ``val_fraction``, ``patience``, ``seed``,
    ``progress`` (at ``lr`` 1e-3 the training can amplify rounding-level input differences about
    e-fold per epoch on some data, so fits from activations extracted in another batch or on another
    device differ though they validate alike; 3e-4 avoids that at about three times the epochs);
    ``stopping`` ``"holdout"`` (default: early stopping on a ``val_fraction`` split,
    the best-validation weights kept) or ``"cv"`` (:func:`cv_epochs`: the number of epochs is chosen
    on the pooled out-of-fold loss of ``stopping_folds`` fits, then the network is trained on every
    row for that many epochs — an epoch count judged on all rows instead of a tenth, and no row
    left out of the fit); ``loss`` ``"mse"`` (DESIGN §3) or ``"mse_cosine"`` (MSE/mean‖δ‖²·d plus
    ``cosine_weight``·(1 − cos(s(q), δ)), which rewards getting the direction right on rows with
    small δ too); early stopping always watches the validation loss of the same objective.
    ``merge_duplicates``: rows whose queries are the same prompt state (equal up to float
    rounding, see :func:`merge_duplicate_queries`) become one row with their mean δ before
    anything else — several responses to one prompt are one example of "what to add here".
    ``init``: ``"mean"`` (default) starts the network at the mean training δ (routing at the cluster
    proportions, residual zero) and early stopping also considers those starting weights, so the
    fit never ends worse on its validation rows than the plain mean-difference vector; ``"ridge"``
    starts the same routing but the residual at the ridge regression of the training δ's residual
    coefficients on the query features (:func:`ridge_residual`, penalty picked on the validation
    rows, zero when no penalty beats it), written exactly into the MLP (needs ``hidden`` ≥
    2·``residual_dim``), so the fit never ends worse on its validation rows than that linear
    read-out either; ``"random"`` is PyTorch's default initialisation of every layer.
    ``shrink``: ``"off"`` (default) or ``"cv"``: after training, pull the vector field toward the
    mean training δ, s ← m + w·(s − m), with w ∈ [0, 1] chosen by ``shrink_folds``-fold
    cross-validation over the training rows (:func:`cv_shrinkage`) — how far the query-specific part
    is worth trusting, judged on more rows than the validation split early stopping watches.
    """

    k_range: tuple = (4, 10)
    cluster_on: str = "delta"
    residual_dim: int = 10
    hidden: int = 256
    epochs: int = 200
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    val_fraction: float = 0.1
    patience: int = 20
    normalize: bool = True
    residual: str = "all"
    learned_values: bool = False
    attn_dim: Optional[int] = None
    pca_dim: Optional[int] = 256
    query_dim: Optional[int] = 512
    loss: str = "mse"
    cosine_weight: float = 1.0
    merge_duplicates: bool = True
    init: str = "mean"
    shrink: str = "off"
    shrink_folds: int = 5
    stopping: str = "holdout"
    stopping_folds: int = 5
    progress: bool = True

    def replace(self, **changes) -> "MoSEOptions":
        """A copy with ``changes`` applied; an unknown name is a ``TypeError`` naming it."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"{_WHERE}: unknown option(s) {', '.join(unknown)}; see MoSEOptions")
        return dataclasses.replace(self, **changes)

    def validated(self, d: int) -> "MoSEOptions":
        """The options with every value checked (``ValueError`` naming the field) and ``attn_dim``
        resolved for hidden size ``d``. Row-count dependent checks happen in the steps."""
        k_min, k_max = _check_k_range(self.k_range)
        check_choice(self.residual, "residual", _WHERE, RESIDUALS)
        check_choice(self.loss, "loss", _WHERE, LOSSES)
        check_choice(self.init, "init", _WHERE, INITS)
        check_choice(self.shrink, "shrink", _WHERE, SHRINKS)
        check_choice(self.cluster_on, "cluster_on", _WHERE, CLUSTER_ON)
        check_choice(self.stopping, "stopping", _WHERE, STOPPINGS)
        if self.init == "ridge" and self.stopping == "cv":
            raise ValueError(f"{_WHERE}: init='ridge' picks its penalty on the validation rows, which "
                             "stopping='cv' does not keep; use stopping='holdout' with it")
        if self.init == "ridge" and self.hidden < 2 * self.residual_dim:
            raise ValueError(f"{_WHERE}: init='ridge' writes the linear residual into the MLP with two hidden units "
                             f"per residual coefficient; hidden={self.hidden} < 2·residual_dim={2 * self.residual_dim}")
        return dataclasses.replace(
            self, k_range=(k_min, k_max),
            residual_dim=check_int(self.residual_dim, "residual_dim", _WHERE, 1),
            hidden=check_int(self.hidden, "hidden", _WHERE, 1),
            epochs=check_int(self.epochs, "epochs", _WHERE, 1),
            seed=check_int(self.seed, "seed", _WHERE, 0),
            batch_size=check_int(self.batch_size, "batch_size", _WHERE, 1),
            patience=check_int(self.patience, "patience", _WHERE, 1),
            shrink_folds=check_int(self.shrink_folds, "shrink_folds", _WHERE, 2),
            stopping_folds=check_int(self.stopping_folds, "stopping_folds", _WHERE, 2),
            lr=check_real(self.lr, "lr", _WHERE, 0.0, math.inf, low_open=True, high_open=True),
            weight_decay=check_real(self.weight_decay, "weight_decay", _WHERE, 0.0, math.inf, high_open=True),
            val_fraction=check_real(self.val_fraction, "val_fraction", _WHERE, 0.0, 1.0, low_open=True,
                                    high_open=True),
            cosine_weight=check_real(self.cosine_weight, "cosine_weight", _WHERE, 0.0, math.inf, high_open=True),
            attn_dim=min(d, 128) if self.attn_dim is None else check_int(self.attn_dim, "attn_dim", _WHERE, 1),
            pca_dim=None if self.pca_dim is None else check_int(self.pca_dim, "pca_dim", _WHERE, 1),
            query_dim=None if self.query_dim is None else check_int(self.query_dim, "query_dim", _WHERE, 1),
            normalize=bool(self.normalize), learned_values=bool(self.learned_values), progress=bool(self.progress),
            merge_duplicates=bool(self.merge_duplicates))

    def to_dict(self) -> dict:
        """The hyper-parameters recorded in ``fit_stats`` (JSON-serialisable; no ``progress``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("progress", "seed")}
        out["k_range"] = list(self.k_range)
        out["kmeans_restarts"] = KMEANS_RESTARTS
        return out


def option_from_text(text: str) -> tuple:
    """``"NAME=VALUE"`` → ``(name, value)`` for a :class:`MoSEOptions` field, VALUE parsed as the field's
    type: ``true/false/1/0`` for flags, ``a,b`` for ``k_range``, numbers for numbers, ``none`` for
    None (where a field may be None), text otherwise (e.g. ``loss=mse_cosine``, ``shrink=cv``).
    ``ValueError`` names an unknown field or a value that does not parse; the value itself is
    checked by the fit (:meth:`MoSEOptions.validated`)."""
    name, sep, value = text.partition("=")
    known = {f.name for f in dataclasses.fields(MoSEOptions)}
    if not sep or name not in known:
        raise ValueError(f"expected NAME=VALUE with NAME one of {', '.join(sorted(known))}, got {text!r}")
    default = getattr(MoSEOptions(), name)
    if value.lower() == "none":
        return name, None
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return name, value.lower() in ("true", "1")
        if isinstance(default, tuple):
            return name, tuple(int(x) for x in value.split(","))
        if isinstance(default, (int, float)):
            return name, type(default)(value)
        if default is None:  # Optional[int] fields
            return name, int(value)
    except ValueError:
        raise ValueError(f"{name}: cannot parse {value!r}") from None
    return name, value


def fit_mose(queries, deltas, options: Optional[MoSEOptions] = None, **overrides) -> MoSE:
    """Fit a mixture of steering experts from query states ``queries`` [N, d] and targets ``deltas`` [N, d].

    Settings come from ``options`` (default :class:`MoSEOptions()`), with keyword ``overrides``
    applied on top (``fit_mose(q, d, hidden=64)`` = ``fit_mose(q, d, MoSEOptions(hidden=64))``).

    Semantics (DESIGN §3)::

        merge      (merge_duplicates) rows with the same query → one row, δ averaged: for one input
                   the MSE-optimal output is the mean of its targets, and without merging K-means
                   would cluster on what varies between one prompt's pairs (in CAA-style data the
                   written response opening), which the router cannot see in the query
        split      rows into train / validation (val_fraction, seeded); everything below but the
                   early-stopping check uses the training rows only (``stopping="cv"``: no split;
                   the epoch count comes from :func:`cv_epochs`, and the network trains on every
                   row for that many epochs)
        experts    K-means (k-means++, KMEANS_RESTARTS restarts) on δ (``cluster_on="delta"``) or on the
                   centred queries (``"query"``), L2-normalised if ``normalize``, projected on the top
                   min(pca_dim, N, d) principal components; K ∈ k_range maximises the Calinski–Harabasz
                   index; prototypes C [K, d] = cluster means of the raw δ
        residual   U [d, m] = top-m principal components of centred δ ("all") or of δ with span(C)
                   projected out ("prototype_residual")
        network    on x = Πᵀ(q − mean q)/σ, Π = top-min(query_dim, N − 1, d) principal components of
                   the training queries (the identity when query_dim is None or ≥ d):
                   s(h) = softmax((W_q h + b_q) K_Cᵀ/√d_a) V + U (W_2 relu(W_1 h + b_1) + b_2),
                   K_C = C W_kᵀ + b_k, V = C (or learned C W_vᵀ + b_v), started at the mean δ
                   (``init="mean"``: query weights and W_2 zero, routing prior log(n_k/n); ``init="ridge"``:
                   the same routing, β at the validation-picked ridge read-out); trained by AdamW on
                   the ``loss`` (MSE(s(q), δ), or MSE plus a cosine term) with early stopping; the
                   best-validation weights are kept (with ``init="mean"``/``"ridge"`` the starting weights
                   compete too: best_epoch 0)
        shrink     (``shrink="cv"``) s ← m + w·(s − m), m the mean training δ, w ∈ [0, 1] the out-of-fold
                   least-squares weight of :func:`cv_shrinkage` (the whole fit above repeated on
                   ``shrink_folds`` folds of the training rows); exact in the operator's form
                   (:meth:`MoSENetwork.shrink_toward`)
        export     normalisation and Π folded into W_q, b_q, W_1, b_1 (fp64, then fp32);
                   R = W_qᵀ K_Cᵀ/√d_a, c = K_C b_q/√d_a → MoSE(R, c, V, U, W1, b1, W2, b2)

    Fully seeded: the same inputs and ``seed`` give identical tensors, and the global RNG is not
    touched. ``progress`` shows a tqdm bar over epochs. ``queries``/``deltas``: any float
    dtype/device. Bad inputs or options raise ``ValueError`` naming the argument.

    Returns: :class:`MoSE` with ``prototypes``, ``cluster_sizes``, JSON-serialisable ``fit_stats``
    (including held-out ``val_cosine`` and ``val_cosine_mean_delta``) and ``history`` (per-epoch
    train/validation loss).
    """
    return fit_mose_network(queries, deltas, options, **overrides)[0]


def fit_mose_network(queries, deltas, options: Optional[MoSEOptions] = None,
                     **overrides) -> tuple[MoSE, MoSENetwork]:
    """:func:`fit_mose`, also returning the trained :class:`MoSENetwork` (for inspection or
    further training; its output equals the returned MoSE's ``vector`` up to fp32 rounding)."""
    opts = (options if options is not None else MoSEOptions()).replace(**overrides)
    Q, D = _check_data(queries, deltas)
    opts = opts.validated(D.shape[1])
    n_rows = Q.shape[0]
    if opts.merge_duplicates:
        Q, D = merge_duplicate_queries(Q, D)
    n, d = D.shape
    k_min, k_max = opts.k_range

    if opts.stopping == "cv":
        # every row trains; the epoch count and the held-out figures come from the folds
        _check_rows(n, d, opts, f"{n} rows")
        cv = cv_epochs(Q, D, opts)
        train_idx, val_idx = torch.arange(n), torch.arange(0)
    else:
        cv = None
        train_idx, val_idx = holdout_split(n, opts.val_fraction, child_generator(opts.seed, 0), "queries/deltas",
                                           _WHERE)
    n_tr = train_idx.numel()
    _check_rows(n_tr, d, opts, f"{n} rows leave {n_tr} training rows after the validation split "
                f"(val_fraction={opts.val_fraction})" if cv is None else f"{n} rows")
    q_tr, d_tr = Q[train_idx], D[train_idx]
    q_va, d_va = Q[val_idx], D[val_idx]

    experts, U, net = _build(q_tr, d_tr, opts)
    ridge = ridge_start(net, q_tr, d_tr, q_va, d_va) if opts.init == "ridge" else None
    if cv is None:
        result = train_network(net, q_tr, d_tr, q_va, d_va, opts)
    else:
        # the run that chose the epoch count is the CV curve's, and so is the validation loss
        result = dataclasses.replace(train_epochs(net, q_tr, d_tr, opts, cv["epochs"]), epochs_run=cv["epochs_run"],
                                     stopped_early=cv["stopped_early"], best_val_loss=cv["val_loss"])
    shrink = cv_shrinkage(q_tr, d_tr, opts) if opts.shrink == "cv" else None
    if shrink is not None:
        net.shrink_toward(shrink["weight"], d_tr.mean(0))

    stats = {
        "num_experts": experts.prototypes.shape[0],
        "k_range": [k_min, k_max],
        "ch_scores": {str(k): float(v) for k, v in experts.ch_scores.items()},
        "cluster_sizes": [int(x) for x in experts.sizes.tolist()],
        "kmeans_inertia": experts.inertia,
        "clustering_dim": experts.clustering_dim,
        "network_input_dim": d if net.in_proj is None else int(net.in_proj.shape[1]),
        "n_samples": n,
        "n_rows": n_rows,
        "n_train": n_tr,
        "n_val": int(val_idx.numel()),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "train_loss": result.train_loss_at_best,
        "val_loss": result.best_val_loss,
    }
    if cv is None:
        with torch.no_grad():
            pred = net(q_va.float()).double()
        stats.update(_heldout_figures(pred, d_tr.mean(0), d_va))
    else:
        # the same figures, out of fold over every row (each fold's mean δ for the mean vector)
        stats.update(**cv["heldout"],
                     stopping={"folds": cv["folds"], "epochs": cv["epochs"], "val_loss_curve": cv["curve"]})
    stats.update(seed=opts.seed, hyperparameters=opts.to_dict())
    if shrink is not None:
        stats["shrink"] = shrink
    if ridge is not None:
        # None: no penalty beat the zero read-out on the validation rows (the start is the mean δ)
        stats["ridge_penalty"] = None if math.isinf(ridge["penalty"]) else ridge["penalty"]
        stats["ridge_val_mse"] = ridge["val_mse"]
    mose = net.export(prototypes=experts.prototypes.float().contiguous(), cluster_sizes=experts.sizes.float(),
                      fit_stats=stats, history=result.history)
    return mose, net


# ---------------------------------------------------------------------------------------------
# the steps


#: Queries closer than this (relative to their norm, max-abs) are the same prompt state: extraction
#: in different batches changes only the summation order, far below this.
DUPLICATE_RTOL = 1e-4


def choose_null_rows(n_available: int, n: int, seed: int = 0) -> torch.Tensor:
    """Indices (sorted, LongTensor [n]) of ``n`` of ``n_available`` benign prompts, a seeded choice:
    the *null rows* MoSE is fitted to leave alone.

    Null rows are query states paired with δ = 0 ("steer these by nothing") and appended to the
    (query, δ) training data. MoSE then fits E[δ | query] over targets *and* queries that need no
    change, so its vector shrinks on a query that resembles the benign prompts more than the
    targets: the experts learn how much to steer as well as which way. The gate is untouched.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"choose_null_rows: n must be an integer >= 0, got {n!r}")
    if n > n_available:
        raise ValueError(f"choose_null_rows: {n} null rows asked for, but there are only {n_available} benign "
                         f"prompts to draw them from")
    g = torch.Generator().manual_seed(int(seed) + 104729)
    return torch.randperm(n_available, generator=g)[:n].sort().values


def append_null_rows(queries: torch.Tensor, deltas: torch.Tensor, null_queries: torch.Tensor) -> tuple:
    """``(queries', deltas')``: the training rows ``queries`` [N, d] / ``deltas`` [N, d] followed by
    the null rows ``null_queries`` [M, d] at δ = 0 (see :func:`choose_null_rows`)."""
    return torch.cat([queries, null_queries]), torch.cat([deltas, torch.zeros_like(null_queries)])


def merge_duplicate_queries(queries: torch.Tensor, deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``queries`` [N, d] that are the same state (max-abs difference ≤ DUPLICATE_RTOL·‖q‖∞)
    merged into one row each, its δ the mean of theirs → ``(queries [M, d], deltas [M, d])``, M ≤ N,
    in order of first appearance. Exactly-equal rows are found by sorting, near-equal ones among
    rows with the same rounded row sum, so the cost stays O(N log N + N·d) for distinct data."""
    n = queries.shape[0]
    scale = queries.abs().amax(1).clamp_min(1e-30)
    # candidates share a coarse key (row sum rounded at the tolerance); then compare exactly
    key = torch.round(queries.sum(1) / (scale * DUPLICATE_RTOL * queries.shape[1])).tolist()
    groups: dict = {}
    owner = list(range(n))
    reps: list = []
    for i in range(n):
        found = None
        for k in (key[i] - 1, key[i], key[i] + 1):
            for j in groups.get(k, ()):
                if float((queries[i] - queries[j]).abs().max()) <= DUPLICATE_RTOL * float(scale[j]):
                    found = j
                    break
            if found is not None:
                break
        if found is None:
            groups.setdefault(key[i], []).append(i)
            reps.append(i)
        else:
            owner[i] = found
    if len(reps) == n:
        return queries, deltas
    index = {r: m for m, r in enumerate(reps)}
    rows = torch.tensor([index[owner[i]] for i in range(n)])
    counts = torch.bincount(rows, minlength=len(reps)).to(deltas.dtype)
    merged = torch.zeros(len(reps), deltas.shape[1], dtype=deltas.dtype).index_add_(0, rows, deltas)
    return queries[torch.tensor(reps)], merged / counts[:, None]


@dataclass
class Experts:
    """Result of :func:`fit_experts`: ``prototypes`` C [K, d] (fp64, raw-δ cluster means),
    ``sizes`` [K], the Calinski–Harabasz score per candidate K, the K-means inertia and the
    dimension of the clustering space."""

    prototypes: torch.Tensor
    sizes: torch.Tensor
    ch_scores: dict
    inertia: float
    clustering_dim: int


def fit_experts(deltas: torch.Tensor, opts: MoSEOptions, queries: Optional[torch.Tensor] = None) -> Experts:
    """Step 1: K-means experts on training δ [N, d] (fp64), K ∈ ``opts.k_range`` by Calinski–Harabasz.

    The rows clustered are the δ themselves (``opts.cluster_on="delta"``) or ``queries`` [N, d]
    centred (``"query"``); either way each prototype is the mean raw δ of its cluster."""
    if opts.cluster_on == "query":
        if queries is None or queries.shape != deltas.shape:
            raise ValueError(f"{_WHERE}: cluster_on='query' needs the training queries, shaped like deltas "
                             f"{tuple(deltas.shape)}")
        # Centred first: every query shares a large common component that would dominate the
        # normalised rows' directions.
        rows, what = queries - queries.mean(0), "queries"
    else:
        rows, what = deltas, "deltas"
    Z, p = _clustering_space(rows, opts.normalize, opts.pca_dim)
    if float(Z.square().sum()) <= 0.0:
        raise ValueError(f"{_WHERE}: all {what} rows are identical"
                         f"{' after L2 normalisation' if opts.normalize else ''}; there is nothing to cluster into "
                         "experts")
    k_min, k_max = opts.k_range
    clusters, ch = select_k(Z, k_min, k_max, child_generator(opts.seed, 1), n_init=KMEANS_RESTARTS)
    K = clusters.centers.shape[0]
    sizes = clusters.sizes.double()
    C = cluster_sums(deltas, clusters.labels, K) / sizes[:, None]
    return Experts(prototypes=C, sizes=sizes, ch_scores=ch, inertia=float(clusters.inertia), clustering_dim=p)


def residual_basis(deltas: torch.Tensor, prototypes: torch.Tensor, opts: MoSEOptions) -> torch.Tensor:
    """Step 2: U [d, m] (fp64) — top-m principal components of centred training δ (``"all"``), or
    of δ with the prototype span projected out (``"prototype_residual"``)."""
    if opts.residual == "all":
        return principal_directions(deltas - deltas.mean(0), opts.residual_dim)
    Qc = row_basis(prototypes)  # rank-revealing: prototypes may be linearly dependent when K > d
    rest = deltas - (deltas @ Qc) @ Qc.T
    return principal_directions(rest - rest.mean(0), opts.residual_dim)


def build_network(queries: torch.Tensor, deltas: torch.Tensor, prototypes: torch.Tensor, basis: torch.Tensor,
                  opts: MoSEOptions, cluster_sizes: Optional[torch.Tensor] = None) -> MoSENetwork:
    """Step 3: the untrained network, its input normalisation (mean, optional PCA projection to
    ``query_dim``, RMS scale) and output scale (RMS of δ) fixed from the training rows; with
    ``cluster_sizes`` [K] it starts at the size-weighted mix of the prototypes
    (:meth:`MoSENetwork.start_at_mean`)."""
    n, d = queries.shape
    m_q = queries.mean(0)
    centred = queries - m_q
    proj = None
    if opts.query_dim is not None and min(opts.query_dim, n - 1) < d:
        proj = principal_directions(centred, max(1, min(opts.query_dim, n - 1)))
        centred = centred @ proj
    s_q = float(centred.square().mean().sqrt())
    s_d = float(deltas.square().mean().sqrt())
    return MoSENetwork(prototypes, basis, hidden=opts.hidden, attn_dim=opts.attn_dim,
                       learned_values=opts.learned_values, in_mean=m_q, in_scale=s_q if s_q > 0 else 1.0,
                       out_scale=s_d, generator=child_generator(opts.seed, 2), in_proj=proj,
                       cluster_sizes=cluster_sizes)


def ridge_residual(x_train: torch.Tensor, t_train: torch.Tensor, x_val: torch.Tensor, t_val: torch.Tensor,
                   penalties=RIDGE_PENALTIES) -> dict:
    """The affine read-out t ≈ A x + a [m] from features x [p], by ridge regression on the training
    rows (``x_train`` [n, p], ``t_train`` [n, m]), its penalty picked by MSE on the validation rows.

    For each relative penalty g in ``penalties``, λ = g · mean(S²) (S: singular values of the
    centred training features) and A = T̃ᵀ P diag(S/(S² + λ)) Qᵀ with X̃ = P S Qᵀ, T̃ the centred
    targets, a = mean(t) − A mean(x). The zero map (A = 0, a = mean t) competes too, as penalty
    ``inf``. Returns ``{"weight": A [m, p], "bias": a [m], "penalty": g, "val_mse": float}`` (fp64);
    the validation MSE is per element of t.
    """
    X, T = x_train.double(), t_train.double()
    xm, tm = X.mean(0), T.mean(0)
    P, S, Qh = torch.linalg.svd(X - xm, full_matrices=False)
    proj = (T - tm).T @ P                                              # [m, r]
    Xv, Tv = x_val.double(), t_val.double()
    best = {"weight": torch.zeros(T.shape[1], X.shape[1], dtype=torch.float64), "bias": tm, "penalty": math.inf,
            "val_mse": float((tm - Tv).square().mean())}
    scale = float(S.square().mean()) if S.numel() else 0.0
    if scale <= 0.0:
        return best
    for g in penalties:
        A = (proj * (S / (S.square() + g * scale))) @ Qh                # [m, p]
        a = tm - A @ xm
        mse = float((Xv @ A.T + a - Tv).square().mean())
        if mse < best["val_mse"]:
            best = {"weight": A, "bias": a, "penalty": float(g), "val_mse": mse}
    return best


def ridge_start(net: MoSENetwork, q_train: torch.Tensor, d_train: torch.Tensor, q_val: torch.Tensor,
                d_val: torch.Tensor) -> dict:
    """Step 3b (``init="ridge"``): on a network started at the mean δ, set the residual to the
    ridge read-out (:func:`ridge_residual`) of the training rows' residual coefficients
    t = Uᵀ(δ − mean δ)/σ_δ from the features — what is left once routing gives the mean. Returns
    the ridge result (penalty and validation MSE, for ``fit_stats``)."""
    with torch.no_grad():
        x_tr, x_va = net.features(q_train.float()), net.features(q_val.float())
    U, s_d = net.U.double(), float(net.out_scale)
    centre = d_train.double().mean(0)
    fit = ridge_residual(x_tr, (d_train.double() - centre) @ U / s_d, x_va, (d_val.double() - centre) @ U / s_d)
    net.set_linear_residual(fit["weight"], fit["bias"])
    return fit


def train_network(net: MoSENetwork, q_train: torch.Tensor, d_train: torch.Tensor, q_val: torch.Tensor,
                  d_val: torch.Tensor, opts: MoSEOptions) -> TrainResult:
    """Step 4: AdamW on ``opts.loss`` over the training rows, early stopping on the same loss over
    the validation rows; the best-validation weights are left in ``net``."""
    # The input normalisation is fixed, so features are computed once, not every step.
    with torch.no_grad():
        x_tr, x_va = net.features(q_train.float()), net.features(q_val.float())
    s_d = float(net.out_scale)
    batch_loss = _train_loss(net, x_tr, d_train, fixed_values=not opts.learned_values, loss=opts.loss,
                             cosine_weight=opts.cosine_weight)
    y_va = d_val.float()

    def val_loss():
        return _objective(net.forward_features(x_va), y_va, opts.loss, opts.cosine_weight, s_d)

    return train_early_stopping(
        net, batch_loss, val_loss, q_train.shape[0], epochs=opts.epochs, lr=opts.lr, weight_decay=opts.weight_decay,
        batch_size=opts.batch_size, patience=opts.patience, generator=child_generator(opts.seed, 3),
        keep_initial=opts.init != "random",
        loss_scale=s_d, progress=opts.progress, desc=f"MoSE fit (K={net.C.shape[0]})")


def train_epochs(net: MoSENetwork, q_train: torch.Tensor, d_train: torch.Tensor, opts: MoSEOptions,
                 epochs: int) -> TrainResult:
    """Step 4 with ``stopping="cv"``: AdamW on ``opts.loss`` over every training row for exactly
    ``epochs`` epochs (0: the starting weights), no validation. ``history`` has the training loss
    per epoch; ``best_epoch`` = ``epochs``."""
    with torch.no_grad():
        x_tr = net.features(q_train.float())
    trainer = _epoch_trainer(net, x_tr, d_train, opts, child_generator(opts.seed, 3))
    net.eval()
    with torch.no_grad():
        train = float(trainer.batch_loss(torch.arange(q_train.shape[0])))
    history = {"train_loss": []}
    for epoch in range(1, epochs + 1):
        train = trainer.run_epoch()
        check_finite(epoch, "MoSE fit", train_loss=train)
        history["train_loss"].append(train)
    return TrainResult(best_epoch=epochs, best_val_loss=math.nan, train_loss_at_best=train, epochs_run=epochs,
                       stopped_early=False, history=history)


def _epoch_trainer(net: MoSENetwork, x_train: torch.Tensor, d_train: torch.Tensor, opts: MoSEOptions,
                   generator: torch.Generator) -> EpochTrainer:
    """An :class:`EpochTrainer` of ``net`` on ``opts.loss`` over features ``x_train`` [n, p] and
    targets ``d_train`` [n, d], with the options' AdamW settings and batch size."""
    batch_loss = _train_loss(net, x_train, d_train, fixed_values=not opts.learned_values, loss=opts.loss,
                             cosine_weight=opts.cosine_weight)
    return EpochTrainer(net, batch_loss, x_train.shape[0], lr=opts.lr, weight_decay=opts.weight_decay,
                        batch_size=opts.batch_size, generator=generator, loss_scale=float(net.out_scale))


def cv_epochs(queries: torch.Tensor, deltas: torch.Tensor, opts: MoSEOptions) -> dict:
    """How many epochs to train (``stopping="cv"``), chosen on every row instead of a holdout.

    The rows (``queries``, ``deltas`` [n, d], already merged) are cut into ``opts.stopping_folds``
    seeded folds. For each fold the fit's steps 1–3 run on the other rows, and all the folds' networks
    then train side by side, one epoch at a time (:class:`~finesteer.fit.train.EpochTrainer`). After
    every epoch the pooled out-of-fold loss (each fold's validation objective weighted by its rows;
    for ``loss="mse"`` the MSE per element over all n rows) is one point of a curve; the epoch count
    is its argmin (epoch 0, the starting weights, competes unless ``init="random"``), and training
    stops ``opts.patience`` epochs after the last improvement or at ``opts.epochs``. One curve
    averaged over all rows is much less noisy than one holdout's: with a few hundred prompts a tenth
    is a few dozen δ, and which epoch wins on them can turn on float rounding.

    Returns ``{"epochs", "folds", "epochs_run", "stopped_early", "val_loss", "curve", "heldout"}``,
    ``heldout`` the out-of-fold figures of :func:`_heldout_figures` at the chosen epoch (the mean
    vector being each fold's training rows' mean δ).
    """
    from tqdm.auto import tqdm

    n, F = queries.shape[0], opts.stopping_folds
    runs = []
    for j, (rows, keep) in enumerate(_folds(n, F, "stopping_folds", "rows", child_generator(opts.seed, 5))):
        q_tr, d_tr = queries[keep], deltas[keep]
        try:
            _check_rows(q_tr.shape[0], deltas.shape[1], opts, f"{q_tr.shape[0]} rows are left without it")
            _, _, net = _build(q_tr, d_tr, opts)
        except ValueError as err:
            raise _fold_failed(f"stopping='cv' fits MoSE on {F - 1} of {F} folds of the {n} rows", j, err) from None
        with torch.no_grad():
            x_tr, x_va = net.features(q_tr.float()), net.features(queries[rows].float())
        trainer = _epoch_trainer(net, x_tr, d_tr, opts, child_generator(opts.seed, 16 + j))
        runs.append(dict(rows=rows, net=net, trainer=trainer, x_va=x_va, y_va=deltas[rows].float(),
                         anchor=d_tr.double().mean(0), scale=float(net.out_scale)))

    def pooled_loss() -> tuple[float, list]:
        with torch.no_grad():
            preds = [r["net"].forward_features(r["x_va"]) for r in runs]
            total = sum(float(_objective(p, r["y_va"], opts.loss, opts.cosine_weight, r["scale"])) * r["rows"].numel()
                        for p, r in zip(preds, runs))
        return total / n, preds

    best = dict(epoch=0, val=math.inf, preds=None)
    curve = []
    if opts.init != "random":
        val, preds = pooled_loss()
        curve.append(val)
        if math.isfinite(val):
            best.update(val=val, preds=preds)
    stopped_early = False
    bar = tqdm(range(1, opts.epochs + 1), desc=f"MoSE epochs ({F}-fold cross-validation)", unit="epoch",
               disable=not opts.progress, leave=False)
    for epoch in bar:
        train = sum(r["trainer"].run_epoch() for r in runs) / F
        val, preds = pooled_loss()
        check_finite(epoch, "MoSE fit (stopping='cv')", train_loss=train, val_loss=val)
        curve.append(val)
        if val < best["val"]:
            best.update(epoch=epoch, val=val, preds=preds)
        elif epoch - best["epoch"] >= opts.patience:
            stopped_early = True
            break
        bar.set_postfix(val=f"{val:.4g}", best_epoch=best["epoch"])
    bar.close()

    pred = torch.empty(deltas.shape, dtype=torch.float64)
    anchor = torch.empty(deltas.shape, dtype=torch.float64)
    for p, r in zip(best["preds"], runs):
        pred[r["rows"]] = p.double()
        anchor[r["rows"]] = r["anchor"]
    return {"epochs": best["epoch"], "folds": F, "epochs_run": len(curve) - (opts.init != "random"),
            "stopped_early": stopped_early, "val_loss": best["val"], "curve": curve,
            "heldout": _heldout_figures(pred, anchor, deltas.double())}


def cv_shrinkage(queries: torch.Tensor, deltas: torch.Tensor, opts: MoSEOptions) -> dict:
    """Step 5 (``shrink="cv"``): how far to trust the query-specific part of the fit.

    The training rows (``queries``, ``deltas`` [n, d], already merged) are cut into
    ``opts.shrink_folds`` seeded folds; for each fold the whole fit (same options, no shrinkage) is
    repeated on the other rows and predicts the fold's rows: p_i, with a_i the mean δ of the rows it
    was fitted on. The weight is the least-squares w of δ_i − a_i ≈ w (p_i − a_i) over all rows,
    clipped to [0, 1]: 1 keeps the fit as trained, 0 is the plain mean vector. (Early stopping's own
    validation rows are a tenth of the data by default — with a few hundred prompts, a few dozen δ
    whose noise can pass for signal.)

    Returns ``{"weight": w, "folds": F, "cv_mse": …, "cv_mse_trained": …, "cv_mse_mean": …}``: the
    out-of-fold MSE per element at w, at 1 and at 0.
    """
    from tqdm.auto import tqdm

    n, F = queries.shape[0], opts.shrink_folds
    folds = _folds(n, F, "shrink_folds", "training rows", child_generator(opts.seed, 4))
    inner = opts.replace(shrink="off", merge_duplicates=False, progress=False)
    pred = torch.empty(deltas.shape, dtype=torch.float64)
    anchor = torch.empty(deltas.shape, dtype=torch.float64)
    for j, (rows, keep) in enumerate(tqdm(folds, desc="MoSE shrinkage (cross-validation)", disable=not opts.progress)):
        try:
            _, net = fit_mose_network(queries[keep], deltas[keep], inner)
        except ValueError as err:
            raise _fold_failed(f"shrink='cv' refits MoSE on {F - 1} of {F} folds of the {n} training rows", j,
                               err) from None
        with torch.no_grad():
            pred[rows] = net(queries[rows].float()).double()
        anchor[rows] = deltas[keep].double().mean(0)
    target = deltas.double() - anchor
    spread = pred - anchor
    den = float(spread.square().sum())
    weight = 1.0 if den <= 0.0 else min(1.0, max(0.0, float((spread * target).sum()) / den))

    def mse(w: float) -> float:
        return float((w * spread - target).square().mean())

    return {"weight": weight, "folds": F, "cv_mse": mse(weight), "cv_mse_trained": mse(1.0), "cv_mse_mean": mse(0.0)}


# ---------------------------------------------------------------------------------------------
# losses


def _objective(pred: torch.Tensor, target: torch.Tensor, loss: str, cosine_weight: float, scale: float):
    """The training objective on full vectors (validation): MSE per element, plus for
    ``"mse_cosine"`` ``cosine_weight · scale² · mean(1 − cos)`` (``scale`` = RMS of δ, so both terms
    are in δ² units and the optimiser's ``1/scale²`` rescaling sees them at the same weight)."""
    mse = (pred - target).square().mean()
    if loss == "mse":
        return mse
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=-1, eps=1e-12)
    return mse + cosine_weight * scale * scale * (1.0 - cos).mean()


def _train_loss(net: MoSENetwork, x: torch.Tensor, deltas: torch.Tensor, fixed_values: bool, loss: str = "mse",
                cosine_weight: float = 1.0):
    """``batch_loss(idx)`` = the objective of :func:`_objective` over the rows ``idx``.

    With fixed values every s(q) = [α ; β] B lies in the row space of B = [V ; Uᵀ] (rank
    r_B ≤ K + m), so with Q_B an orthonormal basis of it
    ‖s − δ‖² = ‖[α ; β] B Q_B − δ Q_B‖² + ‖δ − δ Q_B Q_Bᵀ‖²: the same loss and gradients computed in
    r_B instead of d dimensions (the second term is a constant, kept so the loss is the true MSE).
    The cosine needs only ⟨s, δ⟩ = ⟨s Q_B, δ Q_B⟩, ‖s‖ = ‖s Q_B‖ and the precomputed ‖δ‖.
    Learned values move B, so they use the direct form.
    """
    d = deltas.shape[1]
    scale = float(net.out_scale)
    if not fixed_values:
        y = deltas.float()
        return lambda idx: _objective(net.forward_features(x[idx]), y[idx], loss, cosine_weight, scale)
    with torch.no_grad():
        B = net.output_basis().double()
    Qb = row_basis(B)
    Bc = (B @ Qb).float()
    yc = deltas @ Qb
    rest = (deltas - yc @ Qb.T).square().sum(1).float()
    norm = deltas.norm(dim=1).float().clamp_min(1e-12)
    yc = yc.float()

    def batch_loss(idx):
        sc = net.coefficients_features(x[idx]) @ Bc
        mse = ((sc - yc[idx]).square().sum(1) + rest[idx]).mean() / d
        if loss == "mse":
            return mse
        cos = (sc * yc[idx]).sum(1) / (sc.norm(dim=1).clamp_min(1e-12) * norm[idx])
        return mse + cosine_weight * scale * scale * (1.0 - cos).mean()
    return batch_loss


def _mean_cosine(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(pred.double(), target.double(), dim=-1, eps=1e-12).mean())


# ---------------------------------------------------------------------------------------------
# checks and helpers


def _heldout_figures(pred: torch.Tensor, mean_delta: torch.Tensor, target: torch.Tensor) -> dict:
    """Held-out quality in units a reader can compare with the plain mean-difference vector: MSE per
    element and mean cosine of ``pred`` [n, d] against ``target`` [n, d], and of ``mean_delta`` ([d],
    or [n, d] where each row has its own, as out of fold) against it (fp64 in, floats out)."""
    mean_delta = mean_delta.expand_as(target)
    return {"val_mse": float((pred - target).square().mean()),
            "val_loss_mean_delta": float((target - mean_delta).square().mean()),
            "val_cosine": _mean_cosine(pred, target),
            "val_cosine_mean_delta": _mean_cosine(mean_delta, target)}


def _build(q_train: torch.Tensor, d_train: torch.Tensor, opts: MoSEOptions):
    """Steps 1–3 on training rows → ``(experts, U, network)``, the network at its starting weights."""
    experts = fit_experts(d_train, opts, queries=q_train)
    U = residual_basis(d_train, experts.prototypes, opts)
    net = build_network(q_train, d_train, experts.prototypes, U, opts,
                        cluster_sizes=None if opts.init == "random" else experts.sizes)
    return experts, U, net


def _folds(n: int, count: int, name: str, what: str, generator: torch.Generator) -> list:
    """``count`` seeded folds of ``range(n)`` → ``[(rows, keep)]``: each fold's indices and the bool
    mask [n] of the other rows; ``ValueError`` naming option ``name`` when ``count`` exceeds the ``n``
    rows (described by ``what``)."""
    if count > n:
        raise ValueError(f"{_WHERE}: {name}={count} exceeds the {n} {what}")
    out = []
    for rows in torch.randperm(n, generator=generator).chunk(count):
        keep = torch.ones(n, dtype=torch.bool)
        keep[rows] = False
        out.append((rows, keep))
    return out


def _fold_failed(context: str, fold: int, err: ValueError) -> ValueError:
    """The error of a fit without fold ``fold``: ``context`` (which cross-validation), then the
    fold's own message without its repeated ``fit_mose:`` prefix."""
    return ValueError(f"{_WHERE}: {context}; the fit without fold {fold} failed: "
                      f"{str(err).removeprefix(_WHERE + ': ')}")


def _check_rows(n_train: int, d: int, opts: MoSEOptions, what: str) -> None:
    """``ValueError`` unless ``n_train`` training rows can hold the fit's K and m (``what`` says where
    the count comes from)."""
    if n_train <= opts.k_range[1]:
        raise ValueError(f"{_WHERE}: {what}; need more than k_max={opts.k_range[1]} (the "
                         "Calinski–Harabasz index needs N > K)")
    if opts.residual_dim > min(n_train, d):
        raise ValueError(f"{_WHERE}: residual_dim={opts.residual_dim} exceeds min(training rows={n_train}, hidden "
                         f"size={d})")


def _check_data(queries, deltas):
    Q = as_matrix(queries, "queries", _WHERE)
    D = as_matrix(deltas, "deltas", _WHERE)
    if Q.shape[0] != D.shape[0]:
        raise ValueError(f"{_WHERE}: queries has {Q.shape[0]} rows but deltas has {D.shape[0]}; need one δ per query")
    if Q.shape[1] != D.shape[1]:
        raise ValueError(f"{_WHERE}: hidden size mismatch: queries has {Q.shape[1]} features, deltas has "
                         f"{D.shape[1]}")
    return Q, D


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


def _clustering_space(rows: torch.Tensor, normalize: bool, pca_dim: Optional[int]):
    """The rows K-means runs on: (optionally L2-normalised) ``rows`` (δ or centred queries), centred
    and projected on their top principal components (distances are kept exactly when pca_dim
    covers the data's rank)."""
    X = rows
    if normalize:
        # A zero δ (identical preferred and undesired responses) stays at the origin.
        X = X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)
    X = X - X.mean(0)
    if pca_dim is None:
        return X, X.shape[1]
    p = min(pca_dim, X.shape[0], X.shape[1])
    return X @ principal_directions(X, p), p
