// Device code of the fused steering operator (DESIGN §4). Semantics: finesteer/reference.py.
//
// Two kernels per call:
//   _steer_partial_kernel  (phase 1, split-d skinny GEMM) grid (splits, row tiles, steerers):
//       block (s, tile, n) reads rows [s·dc, (s+1)·dc) of A_n once and, for the rows of the tile
//       that use steerer n, writes partial sums work[s, t, 0:J] of [hcᵀP | hᵀR | hᵀW1ᵀ] and
//       work[s, t, J] = Σ hc² (hc = h − μ_n). Thread j owns column j; the tile's rows of h (fp32,
//       raw and centred) are staged in shared memory, so one load of A[k, j] feeds TR FMAs.
//       Splitting d over many blocks makes the whole GPU stream A at decode shapes (T ≤ 64).
//   _steer_apply_kernel    (phases 2+3) grid (column chunks, rows): every block reduces the S
//       partial sums of its row in a fixed order (deterministic), runs the epilogue (gate,
//       softmax, relu, W2) in shared memory and writes its chunk of columns:
//       out = h + λ·g·(coef @ B_n), or h itself where that vector element is exactly 0.
//       The epilogue is recomputed by each column chunk of a row (it is tiny: S·(J+1) reads from
//       L2 and m·H FMAs), which keeps the call at two launches with no inter-block sync, no
//       atomics and no zero-initialised workspace (CUDA-graph friendly).
// Bank indices and slots outside their range act as −1 (operator_contract.h), as on every backend.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../operator_contract.h"
#include "steer_cuda.h"

namespace finesteer {
namespace cuda {

constexpr int kChunkK = 64;        // d rows of h staged in shared memory per step of phase 1
constexpr int kApplyThreads = 256; // phase-2 block size

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Bank index of row t: 0 without an index tensor, −1 for "none" and for anything out of range.
__device__ __forceinline__ int64_t row_steerer(const void* index, int is64, int64_t t, int64_t N) {
  if (index == nullptr) return 0;
  return entry_or_none(is64 ? static_cast<const int64_t*>(index)[t] : static_cast<const int32_t*>(index)[t], N);
}

template <int TR, typename TH, typename TW>
__global__ void __launch_bounds__(512)
    _steer_partial_kernel(const SteerParams p, const int64_t rows_per_split) {
  // Rows staged as [k][row] so the TR values one A element multiplies are contiguous.
  __shared__ __align__(16) float hs[kChunkK * TR];
  __shared__ __align__(16) float hcs[kChunkK * TR];
  __shared__ float hcsq[TR];
  __shared__ int use[TR];

  const int64_t T = p.T, d = p.d, J = p.J, r = p.r;
  const int64_t s = blockIdx.x, n = blockIdx.z;
  const int64_t k_begin = s * rows_per_split;
  const int64_t k_end = min(d, k_begin + rows_per_split);
  const TH* h = static_cast<const TH*>(p.h);
  const TW* An = static_cast<const TW*>(p.A) + n * d * J;
  const float* mun = p.mu + n * d;
  const int nwarps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t ntiles = (T + TR - 1) / TR;

  for (int64_t tile = blockIdx.y; tile < ntiles; tile += gridDim.y) {
    const int64_t t0 = tile * TR;
    __syncthreads();  // the previous tile's readers of use/hcsq are done
    if (threadIdx.x < TR) {
      const int64_t t = t0 + threadIdx.x;
      use[threadIdx.x] = (t < T && row_steerer(p.index, p.index_is_64, t, p.N) == n) ? 1 : 0;
      hcsq[threadIdx.x] = 0.f;
    }
    __syncthreads();
    int any = 0;
#pragma unroll
    for (int i = 0; i < TR; ++i) any |= use[i];
    if (!any) continue;  // block-uniform: no row of this tile uses steerer n

    for (int64_t jbase = 0; jbase < J; jbase += blockDim.x) {
      const int64_t j = jbase + threadIdx.x;
      const bool active = j < J;
      // Gate-subspace columns (j < r) see the centred row, the others the raw row.
      const float* xs = (j < r) ? hcs : hs;
      float acc[TR];
#pragma unroll
      for (int i = 0; i < TR; ++i) acc[i] = 0.f;

      for (int64_t kc = k_begin; kc < k_end; kc += kChunkK) {
        const int kn = static_cast<int>(min(static_cast<int64_t>(kChunkK), k_end - kc));
        __syncthreads();  // previous chunk consumed
        for (int e = threadIdx.x; e < TR * kChunkK; e += blockDim.x) {
          const int i = e / kChunkK, kk = e % kChunkK;  // consecutive threads: consecutive k of one row
          const int64_t t = t0 + i;
          float x = 0.f, xc = 0.f;
          if (kk < kn && use[i]) {
            x = to_float(h[t * p.ldh + kc + kk]);
            xc = x - mun[kc + kk];
          }
          hs[kk * TR + i] = x;
          hcs[kk * TR + i] = xc;
        }
        __syncthreads();
        if (jbase == 0) {  // Σ hc² of this chunk: one warp per row, each row owned by one warp
          for (int i = warp; i < TR; i += nwarps) {
            float q = 0.f;
            for (int kk = lane; kk < kChunkK; kk += 32) q += hcs[kk * TR + i] * hcs[kk * TR + i];
            q = warp_sum(q);
            if (lane == 0) hcsq[i] += q;
          }
        }
        if (active) {
          const TW* a = An + kc * J + j;
#pragma unroll 8
          for (int kk = 0; kk < kn; ++kk) {
            const float av = to_float(a[static_cast<int64_t>(kk) * J]);
#pragma unroll
            for (int i = 0; i < TR; ++i) acc[i] = fmaf(xs[kk * TR + i], av, acc[i]);
          }
        }
      }
      if (active) {
#pragma unroll
        for (int i = 0; i < TR; ++i) {
          if (use[i]) p.work[(s * T + t0 + i) * (J + 1) + j] = acc[i];
        }
      }
    }
    __syncthreads();  // hcsq complete
    if (threadIdx.x < TR && use[threadIdx.x]) {
      p.work[(s * T + t0 + threadIdx.x) * (J + 1) + J] = hcsq[threadIdx.x];
    }
  }
}

// VECTORS = false: out (TH) = select(v == 0, h, round(h + v)); true: out (fp32) = v.
template <bool VECTORS, typename TH, typename TW>
__global__ void __launch_bounds__(kApplyThreads)
    _steer_apply_kernel(const SteerParams p, const int64_t splits, const int64_t col_chunk) {
  extern __shared__ float smem[];
  float* acc = smem;              // [J + 1] reduced phase-1 sums; MLP part becomes relu(·) in place
  float* coef = smem + p.J + 1;   // [K + m] = [α ; β]
  __shared__ float scale_s;

  const int64_t T = p.T, d = p.d, J = p.J, r = p.r, K = p.K, H = p.H, m = p.m;
  const int64_t c0 = blockIdx.x * col_chunk, c1 = min(d, c0 + col_chunk);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const TH* h = static_cast<const TH*>(p.h);

  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    const TH* hrow = h + t * p.ldh;
    const int64_t n = row_steerer(p.index, p.index_is_64, t, p.N);
    __syncthreads();  // shared memory of the previous row is no longer read
    float scale = 0.f;
    if (n >= 0) {
      for (int64_t j = threadIdx.x; j <= J; j += blockDim.x) {
        float v = 0.f;
        for (int64_t s = 0; s < splits; ++s) v += p.work[(s * T + t) * (J + 1) + j];
        acc[j] = v;
      }
      __syncthreads();
      if (warp == 0) {  // gate and routing softmax (reads acc[0, r + K) and acc[J])
        float pn = 0.f;
        for (int64_t j = lane; j < r; j += 32) pn += acc[j] * acc[j];
        pn = warp_sum(pn);
        const float score = pn / (acc[J] + p.eps);
        const float g = gate_value(p.gate_mode[n], score, p.threshold[n], p.temperature[n]);
        const float* cn = p.c + n * K;
        float mx = -INFINITY;
        for (int64_t k = lane; k < K; k += 32) mx = fmaxf(mx, acc[r + k] + cn[k]);
        mx = warp_max(mx);
        float sum = 0.f;
        for (int64_t k = lane; k < K; k += 32) {
          const float e = expf(acc[r + k] + cn[k] - mx);
          coef[k] = e;
          sum += e;
        }
        sum = warp_sum(sum);
        for (int64_t k = lane; k < K; k += 32) coef[k] /= sum;  // same lane wrote it
        if (lane == 0) scale_s = p.strength[n] * g;
      }
      // MLP hidden layer in place (acc[r + K + i], disjoint from what warp 0 reads).
      for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
        const float u = acc[r + K + i] + p.b1[n * H + i];
        acc[r + K + i] = u > 0.f ? u : (u == u ? 0.f : u);  // relu that keeps NaN, as torch.relu
      }
      __syncthreads();
      const TW* W2n = static_cast<const TW*>(p.W2) + n * m * H;
      const float* z = acc + r + K;
      for (int64_t q = warp; q < m; q += nwarps) {
        float v = 0.f;
        for (int64_t i = lane; i < H; i += 32) v = fmaf(to_float(W2n[q * H + i]), z[i], v);
        v = warp_sum(v);
        if (lane == 0) coef[K + q] = v + p.b2[n * m + q];
      }
      __syncthreads();
      scale = scale_s;
    }

    if (scale == 0.f) {  // index −1, closed gate or λ = 0: h unchanged / zero vector (block-uniform)
      for (int64_t col = c0 + threadIdx.x; col < c1; col += blockDim.x) {
        if (VECTORS) {
          static_cast<float*>(p.out)[t * d + col] = 0.f;
        } else {
          static_cast<TH*>(p.out)[t * d + col] = hrow[col];
        }
      }
      continue;
    }
    const TW* Bn = static_cast<const TW*>(p.B) + n * (K + m) * d;
    const int64_t KM = K + m;
    for (int64_t col = c0 + threadIdx.x; col < c1; col += blockDim.x) {
      float v = 0.f;
      for (int64_t j = 0; j < KM; ++j) v = fmaf(coef[j], to_float(Bn[j * d + col]), v);
      const float y = scale * v;
      if (VECTORS) {
        static_cast<float*>(p.out)[t * d + col] = y;
      } else {
        const TH hv = hrow[col];
        static_cast<TH*>(p.out)[t * d + col] = (y == 0.f) ? hv : from_float<TH>(to_float(hv) + y);
      }
    }
  }
}

template <typename TH>
__global__ void _add_vectors_kernel(const AddParams p) {
  const TH* h = static_cast<const TH*>(p.h);
  TH* out = static_cast<TH*>(p.out);
  const int64_t total = p.T * p.d;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / p.d, col = e - t * p.d;
    int64_t sv = t;
    if (p.slot != nullptr) {
      sv = entry_or_none(
          p.slot_is_64 ? static_cast<const int64_t*>(p.slot)[t] : static_cast<const int32_t*>(p.slot)[t], p.S);
    }
    const TH hv = h[t * p.ldh + col];
    if (sv < 0) {  // −1 or out of range: unchanged
      out[e] = hv;
      continue;
    }
    const float y = p.vectors[sv * p.d + col];
    out[e] = (y == 0.f) ? hv : from_float<TH>(to_float(hv) + y);
  }
}

}  // namespace cuda
}  // namespace finesteer
