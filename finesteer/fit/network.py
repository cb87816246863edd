"""The trainable MoSE network (DESIGN §3, step 3) and its export to the inference form.

Training sees normalised inputs and outputs: queries centred, optionally projected on their
top principal components, and scaled to unit mean square per coordinate; δ scaled to unit RMS.
Raw LLM hidden states have large, model-dependent norms that would otherwise set the effective
learning rate, and the projection makes the first layers d/p times cheaper to train (the
training queries span at most N − 1 directions anyway). All of it is affine, so :meth:`export`
folds it into ``W_q, b_q, W_1, b_1, W_2, b_2`` and the exported :class:`~finesteer.mose.MoSE`
takes raw hidden states [d], exactly as the kernels do.

The key (and learned value) layers read the prototypes through their coordinates in span(C):
``C W_kᵀ`` only depends on ``W_k`` restricted to span(C), so ``W_k = W̃_k Q_Cᵀ`` (Q_C an
orthonormal basis of span(C), [d, r_C]) is the same family of keys with r_C instead of d inputs
and no parameters that could only ever be decayed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..mose import MoSE


def _linear(n_in: int, n_out: int, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear`` with PyTorch's default U(−1/√n_in, 1/√n_in) init drawn from ``generator``
    (``skip_init`` avoids touching the global RNG)."""
    layer = torch.nn.utils.skip_init(nn.Linear, n_in, n_out)
    bound = 1.0 / math.sqrt(n_in)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


def row_basis(A: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """Orthonormal basis [d, r] of the row space of ``A`` [k, d] (r = numerical rank), fp64."""
    _, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    r = max(1, int((S > rtol * S[0]).sum())) if float(S[0]) > 0 else 1
    return Vh[:r].T.contiguous()


class MoSENetwork(nn.Module):
    """Mixture of steering experts with attention routing over fixed prototypes.

    Semantics (raw hidden state ``h`` [d]; features ``x = Πᵀ(h − m_q) / σ_q`` [p], Π = ``in_proj``
    [d, p] with orthonormal columns or the identity; ``C̃ = (C / σ_δ) Q_C`` [K, r_C]; weights in
    ``nn.Linear`` convention ``W ∈ R^{out×in}``)::

        K_C  = C̃ W̃_kᵀ + b_k           (= C W_kᵀ + b_k with W_k = W̃_k Q_Cᵀ / σ_δ)    # [K, d_a]
        α(h) = softmax((W_q x + b_q) K_Cᵀ / √d_a + e)      (e: per-expert prior)  # [K]
        V    = C,  or learned  σ_δ (C̃ W̃_vᵀ + b_v)   (W̃_v = Q_C, b_v = 0 at init, i.e. V = C)
        β(h) = σ_δ (W_2 relu(W_1 x + b_1) + b_2)                                  # [m]
        s(h) = α(h) V + U β(h)                                                    # [d]

    Buffers: ``C`` [K, d] prototypes, ``U`` [d, m] residual basis, ``in_mean`` [d], ``in_proj``
    [d, p] (None: identity), ``proto_basis`` Q_C [d, r_C], ``in_scale`` σ_q and ``out_scale`` σ_δ.
    :meth:`forward` maps raw [B, d] → [B, d] (fp32). :meth:`features` gives x, and the ``*_features``
    methods take x directly (training projects the data once instead of every step).
    """

    def __init__(self, prototypes: torch.Tensor, basis: torch.Tensor, hidden: int, attn_dim: int,
                 learned_values: bool, in_mean: torch.Tensor, in_scale: float, out_scale: float,
                 generator: torch.Generator, in_proj: Optional[torch.Tensor] = None,
                 cluster_sizes: Optional[torch.Tensor] = None):
        super().__init__()
        d = prototypes.shape[1]
        m = basis.shape[1]
        self.attn_dim = attn_dim
        Q_C = row_basis(prototypes)
        self.register_buffer("C", prototypes.float().contiguous())
        self.register_buffer("U", basis.float().contiguous())
        self.register_buffer("in_mean", in_mean.float().contiguous())
        self.register_buffer("in_proj", None if in_proj is None else in_proj.float().contiguous())
        self.register_buffer("proto_basis", Q_C.float())
        self.register_buffer("proto_coords", ((prototypes.double() / out_scale) @ Q_C).float())
        self.register_buffer("in_scale", torch.tensor(float(in_scale)))
        self.register_buffer("out_scale", torch.tensor(float(out_scale)))
        # Shrinkage toward a fixed vector (:meth:`shrink_toward`); weight 1 and anchor 0 leave s(h) as is.
        self.register_buffer("shrink_weight", torch.tensor(1.0))
        self.register_buffer("shrink_anchor", torch.zeros(d))
        p = d if in_proj is None else in_proj.shape[1]
        r_c = Q_C.shape[1]
        self.query = _linear(p, attn_dim, generator)
        self.key = _linear(r_c, attn_dim, generator)
        self.value = None
        if learned_values:
            # Start at V = C: the prototypes are already a good answer; training refines them.
            self.value = torch.nn.utils.skip_init(nn.Linear, r_c, d)
            with torch.no_grad():
                self.value.weight.copy_(Q_C)
                self.value.bias.zero_()
        self.fc1 = _linear(p, hidden, generator)
        self.fc2 = _linear(hidden, m, generator)
        # Routing prior: a free per-expert logit (exported into c). It lets the network start at,
        # and fall back to, the size-weighted mix of the experts.
        self.expert_bias = nn.Parameter(torch.zeros(prototypes.shape[0]))
        if cluster_sizes is not None:
            self.start_at_mean(cluster_sizes)

    @torch.no_grad()
    def start_at_mean(self, cluster_sizes: torch.Tensor) -> None:
        """Set the weights so that s(h) = Σ_k (n_k/n) C_k for every h — the mean training δ when
        ``C`` holds cluster means of ``cluster_sizes`` [K] rows — while every weight still receives
        a gradient: query weights and bias zero (the routing logits are the prior log(n_k/n) alone),
        the residual's last layer zero (β = 0; like LoRA's zero B). Training then moves away from
        the mean vector only as far as the validation loss rewards it."""
        self.query.weight.zero_()
        self.query.bias.zero_()
        self.expert_bias.copy_(torch.log(cluster_sizes.double() / cluster_sizes.double().sum()).float())
        self.fc2.weight.zero_()
        self.fc2.bias.zero_()

    @torch.no_grad()
    def shrink_toward(self, weight: float, anchor: torch.Tensor) -> None:
        """From now on s(h) = anchor + w·(s_trained(h) − anchor), w = ``weight`` ∈ [0, 1], ``anchor`` [d]
        (the fit uses its mean training δ) — exactly, in the operator's own form: the expert weights
        sum to one, so w·α(h)V + (1 − w)·anchor = α(h)·(w·V + (1 − w)·anchor), and the residual's
        coefficients scale by w. Applies to the trained weights and is folded in by :meth:`export`.
        Not meant for training afterwards (the values' buffer form is fixed)."""
        if not 0.0 <= float(weight) <= 1.0:
            raise ValueError(f"shrink_toward: weight must be in [0, 1], got {weight}")
        if tuple(anchor.shape) != tuple(self.shrink_anchor.shape):
            raise ValueError(f"shrink_toward: anchor must have shape {list(self.shrink_anchor.shape)}, got "
                             f"{list(anchor.shape)}")
        self.shrink_weight.fill_(float(weight))
        self.shrink_anchor.copy_(anchor.to(self.shrink_anchor.dtype))

    @torch.no_grad()
    def set_linear_residual(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Make the residual coefficients an affine map of the features, β(h) = σ_δ (A x + a)
        exactly, with ``weight`` A [m, p] and ``bias`` a [m] — through the MLP the operator already
        has, since z = relu(z) − relu(−z): hidden units 0..m−1 compute relu(A x + a), units m..2m−1
        relu(−(A x + a)), and W_2 = [I, −I, 0]. The other hidden units keep their weights but start
        with a zero output column, so they still receive gradients. Needs ``hidden`` ≥ 2m."""
        m, p = self.fc2.out_features, self.fc1.in_features
        if tuple(weight.shape) != (m, p) or tuple(bias.shape) != (m,):
            raise ValueError(f"set_linear_residual: need weight [{m}, {p}] and bias [{m}], got "
                             f"{list(weight.shape)} and {list(bias.shape)}")
        if self.fc1.out_features < 2 * m:
            raise ValueError(f"set_linear_residual: hidden={self.fc1.out_features} < 2·residual_dim={2 * m}; an "
                             "affine residual needs two hidden units per residual coefficient")
        A, a = weight.to(self.fc1.weight.dtype), bias.to(self.fc1.bias.dtype)
        self.fc1.weight[:m], self.fc1.bias[:m] = A, a
        self.fc1.weight[m:2 * m], self.fc1.bias[m:2 * m] = -A, -a
        eye = torch.eye(m, dtype=self.fc2.weight.dtype)
        self.fc2.weight.zero_()
        self.fc2.weight[:, :m], self.fc2.weight[:, m:2 * m] = eye, -eye
        self.fc2.bias.zero_()

    # --- pieces -------------------------------------------------------------------------------
    def features(self, h: torch.Tensor) -> torch.Tensor:
        """x [B, p] from raw hidden states h [B, d]."""
        x = h.float() - self.in_mean
        if self.in_proj is not None:
            x = x @ self.in_proj
        return x / self.in_scale

    def keys(self) -> torch.Tensor:
        """K_C [K, d_a]."""
        return self.key(self.proto_coords)

    def values(self) -> torch.Tensor:
        """V [K, d] in raw δ units (with the shrinkage of :meth:`shrink_toward` applied)."""
        V = self.C if self.value is None else self.out_scale * self.value(self.proto_coords)
        return self.shrink_weight * V + (1.0 - self.shrink_weight) * self.shrink_anchor

    def output_basis(self) -> torch.Tensor:
        """B = [V ; Uᵀ] [K + m, d]: s(h) = [α(h) ; β(h)] B."""
        return torch.cat([self.values(), self.U.T], dim=0)

    def coefficients_features(self, x: torch.Tensor) -> torch.Tensor:
        """[α ; β] [B, K + m] from features x (β in raw δ units)."""
        alpha = torch.softmax(self.query(x) @ self.keys().T / math.sqrt(self.attn_dim) + self.expert_bias, dim=-1)
        beta = (self.shrink_weight * self.out_scale) * self.fc2(torch.relu(self.fc1(x)))
        return torch.cat([alpha, beta], dim=-1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """s [B, d] from features x [B, p]."""
        return self.coefficients_features(x) @ self.output_basis()

    # --- on raw hidden states -----------------------------------------------------------------
    def routing(self, h: torch.Tensor) -> torch.Tensor:
        """α(h) [B, K]."""
        return self.coefficients_features(self.features(h))[..., :self.C.shape[0]]

    def coefficients(self, h: torch.Tensor) -> torch.Tensor:
        """β(h) [B, m] in raw δ units."""
        return self.coefficients_features(self.features(h))[..., self.C.shape[0]:]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """s(h) [B, d] from raw hidden states h [B, d]."""
        return self.forward_features(self.features(h))

    @torch.no_grad()
    def export(self, **extra) -> MoSE:
        """The inference form (DESIGN §3): routing collapses because the prototypes are fixed.

        With the normalisation folded in (``W_q' = W_q Πᵀ / σ_q`` [d_a, d], ``b_q' = b_q − W_q' m_q``)::

            R = W_q'ᵀ K_Cᵀ / √d_a  [d, K]        c = K_C b_q' / √d_a + e  [K]
            W1 = W_1 Πᵀ / σ_q,  b1 = b_1 − W1 m_q,   W2 = w σ_δ W_2,  b2 = w σ_δ b_2,
            V = w V_trained + (1 − w) a,  U as trained       (w, a: :meth:`shrink_toward`; 1, 0 unless set)

        Everything is computed in fp64 and rounded once to fp32. ``extra`` is passed to
        :class:`MoSE` (``prototypes``, ``cluster_sizes``, ``fit_stats``, ``history``).
        """
        f64 = torch.float64
        m_q, s_q, s_d = self.in_mean.to(f64), self.in_scale.to(f64), self.out_scale.to(f64)
        root = math.sqrt(self.attn_dim)
        coords = self.proto_coords.to(f64)  # exactly what forward() uses
        Kc = coords @ self.key.weight.to(f64).T + self.key.bias.to(f64)
        lift = (lambda W: W) if self.in_proj is None else (lambda W: W @ self.in_proj.to(f64).T)
        Wq = lift(self.query.weight.to(f64)) / s_q
        bq = self.query.bias.to(f64) - Wq @ m_q
        W1 = lift(self.fc1.weight.to(f64)) / s_q
        b1 = self.fc1.bias.to(f64) - W1 @ m_q
        if self.value is None:
            V = self.C.to(f64)
        else:
            V = s_d * (coords @ self.value.weight.to(f64).T + self.value.bias.to(f64))
        w = self.shrink_weight.to(f64)
        V = w * V + (1.0 - w) * self.shrink_anchor.to(f64)
        out = dict(R=Wq.T @ Kc.T / root, c=Kc @ bq / root + self.expert_bias.to(f64), V=V, U=self.U.to(f64), W1=W1, b1=b1,
                   W2=w * s_d * self.fc2.weight.to(f64), b2=w * s_d * self.fc2.bias.to(f64))
        return MoSE(**{k: v.float().contiguous() for k, v in out.items()}, **extra)
