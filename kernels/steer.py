"""Fused Triton kernels of the steering operator (DESIGN §4) and their host launchers.

Semantics (the spec is :mod:`finesteer.reference`), for row ``t`` using bank steerer ``n``::

    hc    = h − μ_n
    score = ‖P_nᵀ hc‖² / (‖hc‖² + ε)
    g     = {off: 1, hard: 1[score > τ_n], soft: sigmoid((score − τ_n) / T_n)}
    α     = softmax(hᵀR_n + c_n);   β = W2_n relu(W1_n h + b1_n) + b2_n
    v     = [λ_n g α ; λ_n g β] @ B_n                       # fp32, [d]
    out   = select(v == 0, h, round(h + v))                  # rows with index −1: out = h

Kernels
-------
``_steer_fwd_kernel``      token mode (``steer_tokens``) and, with ``WRITE_VECTORS``, the
                           fp32 vectors of prompt mode (``steering_vectors``). One launch.
``_add_vectors_kernel``    prompt-mode decode: ``out[t] = select(v == 0, h, h + vectors[slot[t]])``.

Design of ``_steer_fwd_kernel``
-------------------------------
The operator is two skinny GEMMs around a tiny epilogue: ``h [T, d] @ A [d, J]`` (J = r + K + H,
a few hundred), a per-row epilogue on J numbers, and ``coef [T, K + m] @ B [K + m, d]``. At
decode (T = 1..64) it is bound by reading ``A`` once (d = 4096, J = 282: 4.6 MB fp32, 2.3 MB
bf16); ``B`` is ~7 % of that. The grid is ``(row blocks, SPLIT)``:

* **Phase 1 (all programs).** Program ``(b, s)`` streams its slice ``[s·d_chunk, (s+1)·d_chunk)``
  of ``d`` for the ``BLOCK_T`` rows of block ``b`` and accumulates, in fp32,
  ``Pᵀ(h − μ)``, ``hᵀR``, ``‖h − μ‖²`` (one pass over d) and then ``hᵀW1ᵀ`` in
  ``BLOCK_H``-wide column chunks (one more pass over its slice of ``h`` per chunk), so the
  registers held are bounded whatever ``H`` is (``BLOCK_T × BLOCK_H`` accumulators plus a
  ``BLOCK_D × BLOCK_H`` weight tile). The partial sums go to an fp32 workspace
  ``ws[s, t, :]``.
* **Split-d (decode).** With few row blocks a single program per block would stream all of
  ``A`` through one SM (tens of µs). The launcher then splits ``d`` into ``SPLIT`` slices so
  about one program per SM reads a disjoint part of ``A`` (full-chip bandwidth). Each program
  publishes its partials and bumps a per-block arrival counter (``atomic_add``, acq_rel, gpu
  scope, after a CTA barrier so every thread's stores are ordered before it); the *last*
  program to arrive sums the ``SPLIT`` partials in the fixed order s = 0, 1, … (so results are
  deterministic and independent of arrival order), and runs the epilogue and phase 2 for the
  block. Partials are read with ``.cg`` (L2, bypassing the non-coherent L1); workspace rows are
  padded to 128 B so no cache line straddles two row blocks. The counter is zeroed by the
  launcher (``torch.zeros``: one fill on the stream, graph-capturable), so a split launch is a
  fill plus one kernel; an unsplit launch (``SPLIT == 1``, prefill) is exactly one kernel and the
  same program reads back its own partials after a CTA barrier.
* **Epilogue + phase 2 (one program per row block).** Gate, softmax (padding experts have
  ``c = −inf``, so ``exp`` gives exactly 0), relu and ``β = relu·W2ᵀ + b2`` (``BLOCK_HE``
  hidden units at a time, read back from the workspace), ``coef = λ·g·[α; β]``, then a pass
  over d: ``v = coef @ B`` tile, ``out = select(v == 0, h, h + v)``. In split mode
  this pass over ``B`` (K + m rows) and ``h`` runs on one program per row block; at T = 1 that
  is ~0.3 MB fp32 through one SM (~2 µs), the price of keeping one kernel with no grid-wide
  wait (a spin-wait would deadlock the interpreter and is not guaranteed co-resident on GPU).
  A cheaper phase 2 (a second, d-parallel kernel reading a ``[T, K + m]`` coefficient buffer)
  is the alternative to measure if the benchmark shows this pass dominating.

Bandwidth behaviour by construction (reasoned from the access pattern; not yet measured on a
GPU — ``benchmarks/gpu_check.sh`` runs ``bench_steer.py --device cuda`` when one is available):
decode reads ``A`` once across ~#SM programs, ``B`` once per row block, ``h`` twice and writes
``out`` once; prefill (many row blocks, ``SPLIT = 1``) re-reads ``A`` per row block from L2 and
is bound by fp32 FMA throughput (``tl.dot`` with ``input_precision="ieee"``: the spec is fp32
accumulation, TF32 would miss the fp32 tolerance).

Banks. Rows of one block may use different steerers. Each program loops over the bank's
steerers and skips those that no row of its block uses (a scalar branch, no host sync); for a
used steerer, rows of other steerers are masked out of the loads and stores. Index entries
outside ``[0, N)`` (−1 = "unsteered", and every other out-of-range value: the contract of
:mod:`finesteer.reference`) leave the row untouched: ``out = h`` bit for bit (vectors: 0).

Numerics of the gate: ``Pᵀ(h − μ)`` and ``‖h − μ‖²`` are accumulated from the centred tile
``h − μ`` directly, not as ``Pᵀh − Pᵀμ`` and ``‖h‖² − 2hᵀμ + ‖μ‖²``. LLM residual streams have
a few huge, nearly constant channels that μ absorbs; the expanded forms cancel catastrophically
there (relative error ~ 1e-7·‖h‖²/‖h − μ‖²), and ``Pᵀμ`` precomputed in fp32 would not match a
bf16-rounded ``P``. Loading μ costs d·4 bytes per row block, negligible next to ``A``; the P
columns are a separate ``[BLOCK_D, BLOCK_R]`` tile of the same cache lines, so ``A`` still
comes from DRAM once.

Products go through ``_mm``: ``tl.dot`` for row blocks of ≥ 16 (every operand at least 16 wide,
Triton's minimum on NVIDIA), a broadcast multiply + reduction for the 1–4-row blocks of decode;
padding rows/columns are masked to 0. All arithmetic is fp32 (weights of any float dtype are upcast on load); ``out``
is rounded once, to nearest even, to ``h``'s dtype (see ``_round_like`` for bf16).
``python -m finesteer._triton.compile_check`` compiles the launch configurations for sm_90
without a GPU and prints their register use.
Runs compiled on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before this module
is imported: Triton decides interpreted vs compiled when the kernels are decorated).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from finesteer._constants import FLOAT_DTYPES, GATE_EPS, GATE_HARD, GATE_OFF, INDEX_DTYPES


# ----------------------------------------------------------------------------------------------
# device code
# ----------------------------------------------------------------------------------------------


@triton.jit
def _round_like(y, x):
    """fp32 ``y`` rounded once, to nearest even, to the dtype of ``x``.

    bf16 is rounded with integer arithmetic rather than ``.to(tl.bfloat16)``: compiled, the
    two agree (``cvt.rn.bf16.f32``), but Triton's interpreter truncates fp32 → bf16, and the
    integer form keeps CI's results bit-identical to the reference at a cost of a few integer
    ops per element in a memory-bound loop. NaN stays NaN; overflow rounds to ±inf."""
    if x.dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(x.dtype)


@triton.jit
def _mm(a, b):
    """``a @ b`` in fp32 (``a`` [M, K], ``b`` [K, N], both fp32).

    Row blocks of ≥ 16 use ``tl.dot`` (exact fp32 FMA, never TF32). Decode blocks of 1–8 rows
    use a broadcast multiply and a reduction instead: ``tl.dot`` needs M ≥ 16, and padding one
    real row to 16 would multiply the FMA work of a bandwidth-bound GEMV by 16."""
    if a.shape[0] >= 16:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _phase1_partial(h_ptr, ws_row_ptr, A_n, mu_n, rows64, sel, d_lo, d_hi, r, K, H, J,
                    stride_ht, stride_hd,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, WS_PRE: tl.constexpr):
    """Partial sums over ``d ∈ [d_lo, d_hi)`` for the selected rows → workspace row slots:
    ``[0, BLOCK_R)`` Pᵀ(h − μ), ``[BLOCK_R, BLOCK_R + BLOCK_K)`` hᵀR, ``BLOCK_R + BLOCK_K``
    ‖h − μ‖², ``[WS_PRE, WS_PRE + H)`` hᵀW1ᵀ."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    offs_hh = tl.arange(0, BLOCK_H)
    h_rows = h_ptr + rows64[:, None] * stride_ht

    # Pass 1: gate projection of the centred rows, routing logits, centred norm.
    acc_g = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    acc_r = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    ssq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dm = offs_d < d_hi
        m2 = sel[:, None] & dm[None, :]
        x = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=m2, other=0.0).to(tl.float32)
        mu = tl.load(mu_n + offs_d, mask=dm, other=0.0)
        xc = tl.where(m2, x - mu[None, :], 0.0)
        ssq += tl.sum(xc * xc, axis=1)
        a_rows = A_n + offs_d.to(tl.int64)[:, None] * J
        p = tl.load(a_rows + offs_r[None, :], mask=dm[:, None] & (offs_r < r)[None, :], other=0.0)
        acc_g += _mm(xc, p.to(tl.float32))
        rr = tl.load(a_rows + r + offs_k[None, :], mask=dm[:, None] & (offs_k < K)[None, :], other=0.0)
        acc_r += _mm(x, rr.to(tl.float32))
    tl.store(ws_row_ptr[:, None] + offs_r[None, :], acc_g, mask=sel[:, None])
    tl.store(ws_row_ptr[:, None] + BLOCK_R + offs_k[None, :], acc_r, mask=sel[:, None])
    tl.store(ws_row_ptr + BLOCK_R + BLOCK_K, ssq, mask=sel)

    # Pass 2..: MLP pre-activations, BLOCK_H columns at a time (bounded registers for any H).
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + offs_hh
        cm = cols < H
        acc_p = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
        for d0 in range(d_lo, d_hi, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dm = offs_d < d_hi
            x = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=sel[:, None] & dm[None, :],
                        other=0.0).to(tl.float32)
            w = tl.load(A_n + offs_d.to(tl.int64)[:, None] * J + (r + K) + cols[None, :],
                        mask=dm[:, None] & cm[None, :], other=0.0)
            acc_p += _mm(x, w.to(tl.float32))
        tl.store(ws_row_ptr[:, None] + WS_PRE + cols[None, :], acc_p, mask=sel[:, None] & cm[None, :])


@triton.jit
def _sum_partials(ws_row_ptr, cols, mask, ws_split_stride, SPLIT: tl.constexpr):
    """Σ_s ws[s, rows, cols] in the fixed order s = 0, 1, … (deterministic). ``.cg``: read from
    L2, never a stale L1 line written by another program."""
    acc = tl.load(ws_row_ptr + cols, mask=mask, other=0.0, cache_modifier=".cg")
    for s in range(1, SPLIT):
        acc += tl.load(ws_row_ptr + s * ws_split_stride + cols, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _epilogue_and_apply(h_ptr, out_ptr, ws_row_ptr, n, rows64, sel,
                        B_ptr, W2_ptr, c_ptr, b1_ptr, b2_ptr, mode_ptr, thr_ptr, temp_ptr, lam_ptr,
                        d, r, K, H, m, stride_ht, stride_hd, stride_ot, ws_split_stride, eps,
                        SPLIT: tl.constexpr, WRITE_VECTORS: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_DO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_HE: tl.constexpr, BLOCK_M: tl.constexpr, WS_PRE: tl.constexpr,
                        GATE_OFF: tl.constexpr, GATE_HARD: tl.constexpr):
    """Gate, routing softmax, residual MLP and the phase-2 pass over d for the selected rows.

    The MLP runs ``BLOCK_HE`` hidden units at a time, independent of phase 1's ``BLOCK_H``: the
    ``relu·W2ᵀ`` product reduces over hidden units, and a wide reduction dimension costs an FMA
    ``tl.dot`` registers proportional to it."""
    n64 = tl.cast(n, tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    offs_hh = tl.arange(0, BLOCK_HE)
    offs_m = tl.arange(0, BLOCK_M)
    sel2 = sel[:, None]
    wsr = ws_row_ptr[:, None]

    # Gate.
    g_proj = _sum_partials(wsr, offs_r[None, :], sel2, ws_split_stride, SPLIT)
    ssq = _sum_partials(ws_row_ptr, BLOCK_R + BLOCK_K, sel, ws_split_stride, SPLIT)
    score = tl.sum(g_proj * g_proj, axis=1) / (ssq + eps)
    mode = tl.load(mode_ptr + n)
    tau = tl.load(thr_ptr + n)
    temp = tl.load(temp_ptr + n)
    lam = tl.load(lam_ptr + n)
    hard = (score > tau).to(tl.float32)
    soft = 1.0 / (1.0 + tl.exp(-((score - tau) / temp)))
    gate = tl.where(mode == GATE_OFF, 1.0, tl.where(mode == GATE_HARD, hard, soft))
    scale = lam * gate

    # Routing: softmax over the K real experts (padding experts of the bank carry c = −inf and
    # so get weight exactly 0, as do the BLOCK_K − K masked columns).
    kmask = offs_k < K
    logits = _sum_partials(wsr, BLOCK_R + offs_k[None, :], sel2, ws_split_stride, SPLIT)
    c = tl.load(c_ptr + n64 * K + offs_k, mask=kmask, other=float("-inf"))
    logits = logits + c[None, :]
    row_max = tl.max(logits, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # all −inf: α = 0, never NaN
    p = tl.exp(logits - row_max[:, None])
    denom = tl.sum(p, axis=1)
    alpha = p / tl.where(denom == 0.0, 1.0, denom)[:, None]

    # Residual coefficients β = W2 relu(W1 h + b1) + b2, BLOCK_HE hidden units at a time.
    mmask = offs_m < m
    beta = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_HE):
        cols = h0 + offs_hh
        cm = cols < H
        pre = _sum_partials(wsr, WS_PRE + cols[None, :], sel2 & cm[None, :], ws_split_stride, SPLIT)
        b1 = tl.load(b1_ptr + n64 * H + cols, mask=cm, other=0.0)
        act = tl.maximum(pre + b1[None, :], 0.0)
        w2t = tl.load(W2_ptr + n64 * m * H + offs_m[None, :] * H + cols[:, None],
                      mask=cm[:, None] & mmask[None, :], other=0.0)
        beta += _mm(act, w2t.to(tl.float32))
    beta += tl.load(b2_ptr + n64 * m + offs_m, mask=mmask, other=0.0)[None, :]

    # A closed gate makes both coefficient vectors exactly 0, so v == 0 and the row is kept.
    coef_a = alpha * scale[:, None]
    coef_b = beta * scale[:, None]

    # Phase 2: v = coef @ B_n over d; out = select(v == 0, h, round(h + v)).
    B_n = B_ptr + n64 * (K + m) * d
    h_rows = h_ptr + rows64[:, None] * stride_ht
    o_rows = out_ptr + rows64[:, None] * stride_ot
    for d0 in range(0, d, BLOCK_DO):
        offs_d = d0 + tl.arange(0, BLOCK_DO)
        dm = offs_d < d
        vt = tl.load(B_n + offs_k[:, None] * d + offs_d[None, :], mask=kmask[:, None] & dm[None, :], other=0.0)
        ut = tl.load(B_n + (K + offs_m)[:, None] * d + offs_d[None, :], mask=mmask[:, None] & dm[None, :],
                     other=0.0)
        v = _mm(coef_a, vt.to(tl.float32))
        v += _mm(coef_b, ut.to(tl.float32))
        m2 = sel2 & dm[None, :]
        if WRITE_VECTORS:
            tl.store(o_rows + offs_d[None, :], v, mask=m2)
        else:
            x = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=m2, other=0.0)
            y = _round_like(x.to(tl.float32) + v, x)
            tl.store(o_rows + offs_d[None, :], tl.where(v == 0.0, x, y), mask=m2)


@triton.jit
def _copy_rows(h_ptr, out_ptr, rows64, sel, d, stride_ht, stride_hd, stride_ot,
               WRITE_VECTORS: tl.constexpr, BLOCK_DO: tl.constexpr):
    """Unsteered rows: ``out = h`` bit for bit (vectors: 0)."""
    h_rows = h_ptr + rows64[:, None] * stride_ht
    o_rows = out_ptr + rows64[:, None] * stride_ot
    for d0 in range(0, d, BLOCK_DO):
        offs_d = d0 + tl.arange(0, BLOCK_DO)
        m2 = sel[:, None] & (offs_d < d)[None, :]
        if WRITE_VECTORS:
            tl.store(o_rows + offs_d[None, :], tl.zeros(m2.shape, dtype=tl.float32), mask=m2)
        else:
            x = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=m2, other=0.0)
            tl.store(o_rows + offs_d[None, :], x, mask=m2)


@triton.jit
def _steer_fwd_kernel(h_ptr, out_ptr, index_ptr, ws_ptr, counter_ptr,
                      A_ptr, B_ptr, W2_ptr, mu_ptr, c_ptr, b1_ptr, b2_ptr,
                      mode_ptr, thr_ptr, temp_ptr, lam_ptr,
                      T, d, r, K, H, m, num_steerers, d_chunk,
                      stride_ht, stride_hd, stride_ot, ws_split_stride, ws_row_stride, eps,
                      HAS_INDEX: tl.constexpr, WRITE_VECTORS: tl.constexpr, SPLIT: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_HE: tl.constexpr, BLOCK_M: tl.constexpr, WS_PRE: tl.constexpr,
                      GATE_OFF: tl.constexpr, GATE_HARD: tl.constexpr):
    """Grid ``(cdiv(T, BLOCK_T), SPLIT)``; see the module docstring."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    if HAS_INDEX:
        # Out-of-range entries become −1 before the narrowing cast, so an int64 value ≥ 2³¹ can
        # never wrap onto a valid steerer.
        idx = tl.load(index_ptr + rows, mask=row_ok, other=-1)
        idx = tl.where((idx >= 0) & (idx < num_steerers), idx, -1).to(tl.int32)
        n_loop = num_steerers
    else:
        idx = tl.where(row_ok, 0, -1)
        n_loop = 1
    J = r + K + H
    ws_rows = ws_ptr + rows64 * ws_row_stride

    # Phase 1: this program's slice of d, for every steerer some row of the block uses.
    d_lo = pid_s * d_chunk
    d_hi = tl.minimum(d, d_lo + d_chunk)
    for n in range(0, n_loop):
        sel = row_ok & (idx == n)
        if tl.sum(sel.to(tl.int32), axis=0) > 0:
            n64 = tl.cast(n, tl.int64)
            _phase1_partial(h_ptr, ws_rows + pid_s * ws_split_stride, A_ptr + n64 * d * J, mu_ptr + n64 * d,
                            rows64, sel, d_lo, d_hi, r, K, H, J, stride_ht, stride_hd,
                            BLOCK_T, BLOCK_D, BLOCK_R, BLOCK_K, BLOCK_H, WS_PRE)

    # Every thread's partial stores must be ordered before the arrival (or the read-back).
    tl.debug_barrier()
    if SPLIT > 1:
        arrived = tl.atomic_add(counter_ptr + pid_t, 1, sem="acq_rel", scope="gpu")
        is_last = arrived == SPLIT - 1
    else:
        is_last = True

    if is_last:
        for n in range(0, n_loop):
            sel = row_ok & (idx == n)
            if tl.sum(sel.to(tl.int32), axis=0) > 0:
                _epilogue_and_apply(h_ptr, out_ptr, ws_rows, n, rows64, sel,
                                    B_ptr, W2_ptr, c_ptr, b1_ptr, b2_ptr, mode_ptr, thr_ptr, temp_ptr, lam_ptr,
                                    d, r, K, H, m, stride_ht, stride_hd, stride_ot, ws_split_stride, eps,
                                    SPLIT, WRITE_VECTORS, BLOCK_T, BLOCK_DO, BLOCK_R, BLOCK_K, BLOCK_HE,
                                    BLOCK_M, WS_PRE, GATE_OFF, GATE_HARD)
        untouched = row_ok & ((idx < 0) | (idx >= n_loop))
        if tl.sum(untouched.to(tl.int32), axis=0) > 0:
            _copy_rows(h_ptr, out_ptr, rows64, untouched, d, stride_ht, stride_hd, stride_ot,
                       WRITE_VECTORS, BLOCK_DO)


@triton.jit
def _add_vectors_kernel(h_ptr, vec_ptr, slot_ptr, out_ptr, T, d, S,
                        stride_ht, stride_hd, stride_vs, stride_vd, stride_ot,
                        HAS_SLOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(cdiv(T, BLOCK_T), cdiv(d, BLOCK_D))``: ``out = select(v == 0, h, round(h + v))``,
    ``v = vectors[slot[t]]`` (0 for slot −1 or any other value outside ``[0, S)``)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < T
    dm = offs_d < d
    if HAS_SLOT:
        slot = tl.load(slot_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    else:
        slot = rows.to(tl.int64)
    steered = row_ok & (slot >= 0) & (slot < S)
    m2 = row_ok[:, None] & dm[None, :]
    x = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_ht + offs_d[None, :] * stride_hd, mask=m2, other=0.0)
    v = tl.load(vec_ptr + slot[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=steered[:, None] & dm[None, :], other=0.0)
    y = _round_like(x.to(tl.float32) + v, x)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_ot + offs_d[None, :], tl.where(v == 0.0, x, y), mask=m2)


#: True when the kernels above were decorated under ``TRITON_INTERPRET=1`` (they then run on
#: CPU tensors through Triton's interpreter, and not compiled on a GPU).
INTERPRETED = type(_steer_fwd_kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------

_BANK_FP32 = ("mu", "c", "b1", "b2", "threshold", "temperature", "strength")
_sm_count_cache: dict = {}


def _np2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(x))))


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _sm_count_cache:
        _sm_count_cache[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _sm_count_cache[key]


def _check_device(t: torch.Tensor, where: str, what: str) -> None:
    if t.device.type == "cuda":
        if INTERPRETED:
            raise RuntimeError(f"{where}: {what} is a CUDA tensor but the Triton kernels were loaded under "
                               f"TRITON_INTERPRET=1 (CPU interpreter); unset it to run compiled on the GPU")
    elif t.device.type == "cpu":
        if not INTERPRETED:
            raise RuntimeError(f"{where}: {what} is a CPU tensor; the Triton kernels need CUDA tensors "
                               f"(or TRITON_INTERPRET=1 set before import, to run them on the CPU interpreter)")
    else:
        raise RuntimeError(f"{where}: {what} is on {t.device}; the Triton backend supports CUDA "
                           f"(or CPU under TRITON_INTERPRET=1)")


def _check_h(h: torch.Tensor, d: Optional[int], where: str) -> None:
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{where}: h must be a tensor, got {type(h).__name__}")
    if h.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: h must be float32/bfloat16/float16, got {h.dtype}")
    if h.dim() != 2:
        raise ValueError(f"{where}: h must be 2-D [T, d], got shape {tuple(h.shape)}")
    if d is not None and h.shape[1] != d:
        raise ValueError(f"{where}: h has hidden size {h.shape[1]}, the bank has {d}")
    _check_device(h, where, "h")


def _check_rows_index(index: Optional[torch.Tensor], T: int, h: torch.Tensor, where: str, name: str) -> None:
    if index is None:
        return
    if not isinstance(index, torch.Tensor) or index.dtype not in INDEX_DTYPES:
        raise TypeError(f"{where}: {name} must be an int32/int64 tensor or None, got "
                        f"{getattr(index, 'dtype', type(index).__name__)}")
    if tuple(index.shape) != (T,):
        raise ValueError(f"{where}: {name} must have shape [T] = ({T},), got {tuple(index.shape)}")
    if index.device != h.device:
        raise ValueError(f"{where}: {name} is on {index.device}, h on {h.device}")


def _check_bank(bank, h: torch.Tensor, where: str) -> None:
    N, d, J = bank.A.shape
    r, K, H, m = bank.r, bank.K, bank.H, bank.m
    expected = {"A": (N, d, r + K + H), "B": (N, K + m, d), "W2": (N, m, H), "mu": (N, d), "c": (N, K),
                "b1": (N, H), "b2": (N, m), "gate_mode": (N,), "threshold": (N,), "temperature": (N,),
                "strength": (N,)}
    for name, shape in expected.items():
        t = getattr(bank, name)
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}: bank.{name} has shape {tuple(t.shape)}, expected {shape} "
                             f"(N={N}, d={d}, r={r}, K={K}, H={H}, m={m})")
        if t.device != h.device:
            raise ValueError(f"{where}: bank.{name} is on {t.device}, h on {h.device}; move it with bank.to(device)")
        if not t.is_contiguous():
            raise ValueError(f"{where}: bank.{name} must be contiguous")
        if name in ("A", "B", "W2"):
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{where}: bank.{name} must be float32/bfloat16/float16, got {t.dtype}")
            if t.dtype != bank.A.dtype:
                raise TypeError(f"{where}: bank.{name} has dtype {t.dtype} but bank.A has {bank.A.dtype}; "
                                f"A, B, W2 share one weight dtype")
        elif name == "gate_mode":
            if t.dtype != torch.int32:
                raise TypeError(f"{where}: bank.gate_mode must be int32, got {t.dtype}")
        elif t.dtype != torch.float32:
            raise TypeError(f"{where}: bank.{name} must be float32, got {t.dtype}")


def _choose_split(n_row_blocks: int, d: int, block_d: int, device: torch.device,
                  split_d: Optional[int]) -> tuple[int, int]:
    """(SPLIT, d_chunk): how many programs share one row block's pass over d.

    Chosen by reasoning, not yet measured on a GPU (``benchmarks/gpu_check.sh``): the weights are
    read once in total, so the split only decides how many SMs share that read. Aim for about one
    program per SM at decode, but give each at least 4 tiles of d so the last program's reduction
    of ``SPLIT`` partials stays small.
    The interpreter always runs unsplit unless ``split_d`` asks otherwise.
    """
    n_tiles = triton.cdiv(d, block_d)
    if split_d is None:
        if INTERPRETED or device.type != "cuda":
            split_d = 1
        else:
            sms = _sm_count(device)
            split_d = 1 if n_row_blocks * 2 >= sms else min(triton.cdiv(sms, n_row_blocks), max(1, n_tiles // 4))
    split_d = max(1, min(int(split_d), n_tiles))
    d_chunk = triton.cdiv(n_tiles, split_d) * block_d
    return triton.cdiv(d, d_chunk), d_chunk


def _default_config(T: int, H: int) -> dict:
    """Block sizes and warps.

    GPU (register budget checked with ptxas for sm_90 by ``compile_check``, no spills; speed not
    yet measured on a GPU — ``benchmarks/gpu_check.sh``): decode batches of 1, 2 or 3–4 rows get a row block of that size and the
    broadcast-reduce product of :func:`_mm`; larger batches get 16-row blocks and ``tl.dot``.
    Phase-1 weight tiles hold ≤ 4–8K elements, the epilogue takes 16 hidden units per step,
    phase-2 tiles are 64 wide, and loops are not software-pipelined (``num_stages=1``: with
    fp32 weights the pipelined loads spill).
    Interpreter: every Triton op costs ~0.1–1 ms of numpy overhead whatever its size, so larger
    tiles (fewer loop trips) make CI ~5× faster; the code path is the same, and tests also run
    the GPU configuration on small shapes through ``config=``.
    """
    BLOCK_H = min(_np2(H), 256)
    BLOCK_T = 1 if T == 1 else 2 if T == 2 else 4 if T <= 4 else 16
    if INTERPRETED:
        return dict(BLOCK_T=64 if T > 16 else BLOCK_T, BLOCK_D=max(16, min(256, 32768 // BLOCK_H)), BLOCK_DO=512,
                    BLOCK_H=BLOCK_H, BLOCK_HE=BLOCK_H, num_warps=4, num_stages=1)
    if BLOCK_T < 16:
        block_d = max(16, min(32, 8192 // (BLOCK_T * BLOCK_H)))
    else:
        block_d = max(16, min(32, 4096 // BLOCK_H))
    return dict(BLOCK_T=BLOCK_T, BLOCK_D=block_d, BLOCK_DO=64, BLOCK_H=BLOCK_H, BLOCK_HE=min(BLOCK_H, 16),
                num_warps=8 if BLOCK_H >= 256 else 4, num_stages=1)


_CONFIG_KEYS = ("BLOCK_T", "BLOCK_D", "BLOCK_DO", "BLOCK_H", "BLOCK_HE", "num_warps", "num_stages")


def _steer_launch(h: torch.Tensor, bank, index: Optional[torch.Tensor], eps: float, write_vectors: bool,
                  split_d: Optional[int], config: Optional[dict], where: str) -> torch.Tensor:
    _check_h(h, bank.hidden_size, where)
    T, d = h.shape
    _check_rows_index(index, T, h, where, "index")
    _check_bank(bank, h, where)
    if index is not None:
        index = index.contiguous()  # the kernel reads index[t] at offset t
    out = torch.empty((T, d), dtype=torch.float32 if write_vectors else h.dtype, device=h.device)
    if T == 0:
        return out

    r, K, H, m = bank.r, bank.K, bank.H, bank.m
    cfg = _default_config(T, H)
    if config:
        unknown = set(config) - set(_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown config keys {sorted(unknown)}; known: {list(_CONFIG_KEYS)}")
        cfg.update(config)
    for key in _CONFIG_KEYS[:5]:
        v, lo = cfg[key], 1 if key == "BLOCK_T" else 16
        if v < lo or v & (v - 1):
            raise ValueError(f"{where}: config {key}={v} must be a power of two ≥ {lo}")
    n_row_blocks = triton.cdiv(T, cfg["BLOCK_T"])
    SPLIT, d_chunk = _choose_split(n_row_blocks, d, cfg["BLOCK_D"], h.device, split_d)
    BLOCK_R, BLOCK_K, BLOCK_M = _np2(r), _np2(K), _np2(m)

    # Workspace row: [gate proj | logits | ‖h−μ‖² | pre-activations], padded to 32 floats (128 B).
    ws_pre = BLOCK_R + BLOCK_K + 1
    ws_row = triton.cdiv(ws_pre + H, 32) * 32
    ws = torch.empty((SPLIT, T, ws_row), dtype=torch.float32, device=h.device)
    counter = torch.zeros(n_row_blocks, dtype=torch.int32, device=h.device) if SPLIT > 1 else ws
    idx = index if index is not None else ws  # dummy pointer, never read (HAS_INDEX=False)

    grid = (n_row_blocks, SPLIT)
    _steer_fwd_kernel[grid](
        h, out, idx, ws, counter,
        bank.A, bank.B, bank.W2, bank.mu, bank.c, bank.b1, bank.b2,
        bank.gate_mode, bank.threshold, bank.temperature, bank.strength,
        T, d, r, K, H, m, bank.num_steerers, d_chunk,
        h.stride(0), h.stride(1), out.stride(0), ws.stride(0), ws.stride(1), float(eps),
        HAS_INDEX=index is not None, WRITE_VECTORS=write_vectors, SPLIT=SPLIT,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], BLOCK_DO=cfg["BLOCK_DO"], BLOCK_R=BLOCK_R,
        BLOCK_K=BLOCK_K, BLOCK_H=cfg["BLOCK_H"], BLOCK_HE=cfg["BLOCK_HE"], BLOCK_M=BLOCK_M, WS_PRE=ws_pre,
        GATE_OFF=GATE_OFF, GATE_HARD=GATE_HARD,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def steer_tokens_forward(h: torch.Tensor, bank, index: Optional[torch.Tensor] = None, eps: float = GATE_EPS,
                         split_d: Optional[int] = None, config: Optional[dict] = None) -> torch.Tensor:
    """Token mode in one fused launch.

    Semantics::

        out[t] = h[t] + λ·g(h[t])·s(h[t])   using steerer index[t] (None: 0; −1: out[t] = h[t])
        # elements whose vector component is exactly 0 are h's bit for bit

    Shapes: ``h`` [T, d] fp32/bf16/fp16 (any strides); ``index`` [T] int32/int64 or None.
    Returns a new contiguous [T, d] tensor of ``h``'s dtype; ``h`` is not modified.
    ``split_d`` (programs sharing one row block's pass over d) and ``config`` (block sizes, see
    :func:`_default_config`) override the heuristics for tests and tuning; the result does not
    depend on them beyond fp32 summation order.
    """
    return _steer_launch(h, bank, index, eps, False, split_d, config, "triton steer_tokens")


def steering_vectors_forward(h: torch.Tensor, bank, index: Optional[torch.Tensor] = None, eps: float = GATE_EPS,
                             split_d: Optional[int] = None, config: Optional[dict] = None) -> torch.Tensor:
    """λ·g(h)·s(h) per row, fp32.

    Semantics::

        out[t] = λ·g(h[t])·s(h[t])   (steerer index[t]; None: 0; −1: out[t] = 0)

    Shapes: ``h`` [T, d] fp32/bf16/fp16; ``index`` [T] int32/int64 or None → fp32 [T, d].
    ``split_d`` and ``config`` as in :func:`steer_tokens_forward`.
    """
    return _steer_launch(h, bank, index, eps, True, split_d, config, "triton steering_vectors")


def _add_vectors_blocks(T: int, d: int) -> tuple[int, int]:
    """Tiles of ≤ 2K elements: enough programs to spread a decode step's few rows over the SMs."""
    return min(_np2(T, lo=1), 4), min(_np2(d, lo=16), 512)


def add_vectors_forward(h: torch.Tensor, vectors: torch.Tensor, slot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Add cached per-sequence vectors (prompt-mode decode) in one launch.

    Semantics::

        v      = vectors[slot[t]]  (slot None: vectors[t]; slot −1: 0)
        out[t] = select(v == 0, h[t], round(h[t] + v))     # fp32 add, rounded once

    Shapes: ``h`` [T, d] fp32/bf16/fp16; ``vectors`` [S, d] fp32; ``slot`` [T] int32/int64 or
    None (then S must equal T). Returns a new contiguous tensor shaped and typed like ``h``.
    Slot values outside ``[0, S)`` are treated as −1 (the contract of :mod:`finesteer.reference`).
    """
    where = "triton add_vectors"
    _check_h(h, None, where)
    T, d = h.shape
    if not isinstance(vectors, torch.Tensor) or vectors.dtype != torch.float32:
        raise TypeError(f"{where}: vectors must be a float32 tensor, got {getattr(vectors, 'dtype', type(vectors).__name__)}")
    if vectors.dim() != 2 or vectors.shape[1] != d:
        raise ValueError(f"{where}: vectors must be [S, d] with d = {d}, got {tuple(vectors.shape)}")
    if vectors.device != h.device:
        raise ValueError(f"{where}: vectors are on {vectors.device}, h on {h.device}")
    _check_rows_index(slot, T, h, where, "slot")
    if slot is None and vectors.shape[0] != T:
        raise ValueError(f"{where}: with slot=None vectors must have one row per row of h "
                         f"(S = T = {T}), got S = {vectors.shape[0]}")
    out = torch.empty((T, d), dtype=h.dtype, device=h.device)
    if T == 0 or d == 0:
        return out
    if slot is not None:
        slot = slot.contiguous()  # the kernel reads slot[t] at offset t
    BLOCK_T, BLOCK_D = _add_vectors_blocks(T, d)
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(d, BLOCK_D))
    _add_vectors_kernel[grid](
        h, vectors, slot if slot is not None else vectors, out, T, d, vectors.shape[0],
        h.stride(0), h.stride(1), vectors.stride(0), vectors.stride(1), out.stride(0),
        HAS_SLOT=slot is not None, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return out
