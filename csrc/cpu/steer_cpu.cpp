// Fused steering operator on the CPU (DESIGN §4): token mode, steering vectors, add vectors.
//
// Semantics (finesteer/reference.py is the spec), row t with steerer n = index[t]:
//   hc = h − μ_n;  score = ‖P_nᵀ hc‖² / (‖hc‖² + eps);  g = off: 1 | hard: 1[score > τ] | soft: σ((score − τ)/T)
//   α = softmax(hᵀR_n + c_n);  β = W2_n relu(W1_n h + b1_n) + b2_n;  v = λ_n g ([α; β] @ B_n)
//   out = h where v == 0 (select, bit-identical), else round(h + v) once to h's dtype.
// All arithmetic is fp32 whatever the I/O and weight dtypes.
//
// Structure (three phases, rows grouped by steerer so each A_n / B_n is streamed once per row block):
//   1. acc[t, :] = [hcᵀP | hᵀR | hᵀW1ᵀ] and ‖hc‖²: one pass over A's rows; for every group of four
//      A rows (kept in L1) each row of the block does one fused 4-term axpy over the J columns. With
//      fewer row blocks than threads the d range is split across threads and the partial sums
//      reduced. Calls below kSerialWork (decode sizes) run every phase on the calling thread:
//      a fork/join there costs more than it saves on a shared machine (see "threading" below).
//   2. per-row epilogue (gate, softmax, relu, W2): coef = [α; β] and scale = λ·g.
//   3. out[t, cols] = h + scale·(coef @ B[:, cols]) with column chunks spread over threads.
// hcᵀP and ‖hc‖² are formed from h − μ directly (the row and μ are at hand in phase 1), which
// avoids the cancellation of ‖h‖² − 2hᵀμ + ‖μ‖² at no extra cost.
// Bank indices and slots outside their range act as −1 (operator_contract.h), as on every backend.
//
// Vectorisation: the inner loops are plain fp32 loops over contiguous memory written so that GCC
// and Clang vectorise them; they are compiled twice (baseline x86-64 and an AVX2+FMA clone via the
// target attribute) and chosen at run time with __builtin_cpu_supports, so the build needs no
// -march flag. FINESTEER_CPU_ISA=baseline forces the portable path (tests use it).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../operator_contract.h"
#include "../steer_args.h"

#if defined(__GNUC__) && !defined(__clang__)
// The always-inline AVX-width helpers below are only ever inlined; GCC's ABI note about returning
// 32-byte vectors from a non-AVX function does not apply to them.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace finesteer {
namespace {

#if defined(__GNUC__)
#define FS_INLINE inline __attribute__((always_inline))
#else
#define FS_INLINE inline
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FS_HAVE_AVX2_CLONE 1
#define FS_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define FS_HAVE_AVX2_CLONE 0
#define FS_TARGET_AVX2
#endif

// ---- scalar conversions ---------------------------------------------------------------------
FS_INLINE float to_f(float x) { return x; }
FS_INLINE float to_f(c10::BFloat16 x) {
  // bf16 is the top half of an fp32: a shift, which vectorises (c10's conversion does the same).
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
FS_INLINE float to_f(c10::Half x) { return static_cast<float>(x); }

template <class T>
FS_INLINE T from_f(float x) {
  return static_cast<T>(x);  // c10 rounds to nearest even, as torch's .to(dtype) does
}

// ---- vector kernels (inlined into the ISA-specific callers) ---------------------------------
// acc[j] += x0·a0[j] + x1·a1[j] + x2·a2[j] + x3·a3[j]: one load/store of acc per four FMAs.
FS_INLINE void axpy4(float* __restrict acc, const float* __restrict a0, const float* __restrict a1,
                     const float* __restrict a2, const float* __restrict a3, float x0, float x1, float x2,
                     float x3, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += x0 * a0[j] + x1 * a1[j] + x2 * a2[j] + x3 * a3[j];
}

FS_INLINE void axpy1(float* __restrict acc, const float* __restrict a0, float x0, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += x0 * a0[j];
}

template <class TW>
FS_INLINE void convert_row(float* __restrict dst, const TW* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = to_f(src[j]);
}

// ---- problem description --------------------------------------------------------------------
constexpr int kMaxRows = 8;      // rows per block in phases 1 and 3
constexpr int64_t kColChunk = 512;  // phase 3 column chunk

// ---- threading --------------------------------------------------------------------------------
// A call whose phase-1 work (steered rows × d × J multiply-adds) is below kSerialWork runs every
// phase on the calling thread. Why: ATen's OpenMP parallel_for opens a region with *all* threads
// and joins all of them, so a call of a few tens of µs waits for the slowest worker to be
// scheduled. On a shared machine (CPU serving next to other processes) that worker is often
// descheduled and the join costs a scheduler slice: d = 2048, T = 1 took 6.5–23 ms with 2 threads
// and one busy neighbour instead of ~45 µs. One thread streams A at about the BLAS floor (whose
// GEMV at these sizes is single-threaded too), so the quiet-machine cost of staying serial is the
// second core's share of a ~50 µs call, while the busy-machine gain is 100× or more.
// 2^21 ≈ 2.1 M multiply-adds: one row up to d ≈ 7400 (J = 280), two rows at d = 2048.
constexpr int64_t kSerialWork = int64_t{1} << 21;
// add_vectors (prompt-mode decode) is a copy with an add: below this many elements it stays serial.
constexpr int64_t kSerialAddElems = int64_t{1} << 16;

// parallel_for, or the whole range on the calling thread when `serial`.
template <class F>
void for_range(bool serial, int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  if (serial) {
    f(int64_t{0}, n);
  } else {
    at::parallel_for(0, n, grain, f);
  }
}

struct Block {
  int64_t n;      // steerer
  int64_t first;  // offset into the grouped row order
  int64_t rows;   // 1..kMaxRows
};

template <class TH, class TW>
struct Problem {
  const TH* h;  // [T, d] contiguous
  const TW* A;  // [N, d, J]
  const TW* B;  // [N, K + m, d]
  const TW* W2; // [N, m, H]
  const float *mu, *c, *b1, *b2, *thr, *temp, *lam;
  const int32_t* mode;
  int64_t T, d, N, J, r, K, H, m;
  float eps;
  const int64_t* order;  // rows grouped by steerer
};

// Phase 1 for one (block, d-range) task: acc [rows, J + 1] (last column ‖hc‖²) over k ∈ [k0, k1).
template <class TH, class TW>
FS_INLINE void phase1_task(const Problem<TH, TW>& p, const Block& b, int64_t k0, int64_t k1, float* acc) {
  const int64_t J = p.J, r = p.r, ld = J + 1;
  const TW* A = p.A + b.n * p.d * J;
  const float* mu = p.mu + b.n * p.d;
  std::memset(acc, 0, sizeof(float) * b.rows * ld);
  const TH* hrow[kMaxRows];
  for (int64_t i = 0; i < b.rows; ++i) hrow[i] = p.h + p.order[b.first + i] * p.d;
  float hcsq[kMaxRows] = {0.f};
  // fp32 copies of four A rows when the weights are 16-bit (amortised over the block's rows).
  std::vector<float> abuf(std::is_same<TW, float>::value ? 0 : 4 * J);

  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const float* a[4];
    for (int q = 0; q < 4; ++q) {
      if constexpr (std::is_same<TW, float>::value) {
        a[q] = A + (k + q) * J;
      } else {
        convert_row(abuf.data() + q * J, A + (k + q) * J, J);
        a[q] = abuf.data() + q * J;
      }
    }
    const float m0 = mu[k], m1 = mu[k + 1], m2 = mu[k + 2], m3 = mu[k + 3];
    for (int64_t i = 0; i < b.rows; ++i) {
      const TH* hp = hrow[i] + k;
      const float x0 = to_f(hp[0]), x1 = to_f(hp[1]), x2 = to_f(hp[2]), x3 = to_f(hp[3]);
      const float c0 = x0 - m0, c1 = x1 - m1, c2 = x2 - m2, c3 = x3 - m3;
      hcsq[i] += c0 * c0 + c1 * c1 + c2 * c2 + c3 * c3;
      float* ai = acc + i * ld;
      // Gate-subspace columns see the centred row, routing and MLP columns the raw row.
      axpy4(ai, a[0], a[1], a[2], a[3], c0, c1, c2, c3, r);
      axpy4(ai + r, a[0] + r, a[1] + r, a[2] + r, a[3] + r, x0, x1, x2, x3, J - r);
    }
  }
  for (; k < k1; ++k) {
    const float* a0;
    if constexpr (std::is_same<TW, float>::value) {
      a0 = A + k * J;
    } else {
      convert_row(abuf.data(), A + k * J, J);
      a0 = abuf.data();
    }
    for (int64_t i = 0; i < b.rows; ++i) {
      const float x = to_f(hrow[i][k]), cx = x - mu[k];
      hcsq[i] += cx * cx;
      float* ai = acc + i * ld;
      axpy1(ai, a0, cx, r);
      axpy1(ai + r, a0 + r, x, J - r);
    }
  }
  for (int64_t i = 0; i < b.rows; ++i) acc[i * ld + J] = hcsq[i];
}

#if defined(__GNUC__)
#define FS_HAVE_TILED 1
// Register-tiled phase 1 for blocks of ≥ 3 rows: a 4-row × 16-column tile of the sums stays in
// registers while k runs over a chunk of A (kept in L2), so each A element loaded feeds four
// FMAs instead of one and the accumulators are not reloaded per k. GCC/Clang vector extensions
// map v8f to one AVX register in the AVX2 clone and to two SSE registers in the baseline build.
typedef float v8f __attribute__((vector_size(32)));
FS_INLINE v8f ld8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FS_INLINE void st8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
FS_INLINE v8f bc8(float x) { return v8f{x, x, x, x, x, x, x, x}; }

constexpr int64_t kChunkRows = 128;  // rows of A per L2-resident chunk

// acc[i][0:8·NV] += Σ_k X[k][i] · A[k][0:8·NV] for i < 4. X is [kn][4] (rows interleaved).
template <int NV>
FS_INLINE void tile_4rows(const float* __restrict A, int64_t lda, const float* __restrict X, int64_t kn,
                          float* __restrict acc, int64_t ld) {
  v8f c[4][NV];
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < NV; ++v) c[i][v] = ld8(acc + i * ld + 8 * v);
  for (int64_t k = 0; k < kn; ++k) {
    v8f a[NV];
    for (int v = 0; v < NV; ++v) a[v] = ld8(A + k * lda + 8 * v);
    for (int i = 0; i < 4; ++i) {
      const v8f x = bc8(X[4 * k + i]);
      for (int v = 0; v < NV; ++v) c[i][v] += x * a[v];
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < NV; ++v) st8(acc + i * ld + 8 * v, c[i][v]);
}

// Columns [j0, j1) of four rows: 16-wide tiles, then an 8-wide tile, then scalar columns.
FS_INLINE void tile_columns(const float* A, int64_t lda, const float* X, int64_t kn, float* acc, int64_t ld,
                            int64_t j0, int64_t j1) {
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) tile_4rows<2>(A + j, lda, X, kn, acc + j, ld);
  for (; j + 8 <= j1; j += 8) tile_4rows<1>(A + j, lda, X, kn, acc + j, ld);
  for (; j < j1; ++j) {
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    for (int64_t k = 0; k < kn; ++k) {
      const float a = A[k * lda + j];
      s0 += X[4 * k] * a;
      s1 += X[4 * k + 1] * a;
      s2 += X[4 * k + 2] * a;
      s3 += X[4 * k + 3] * a;
    }
    acc[j] += s0;
    acc[ld + j] += s1;
    acc[2 * ld + j] += s2;
    acc[3 * ld + j] += s3;
  }
}

// Phase 1 for one (block, d-range) task, tiled (same contract as phase1_task). acc must hold
// kMaxRows rows: rows past b.rows are computed from zero inputs and ignored by the caller.
template <class TH, class TW>
FS_INLINE void phase1_task_tiled(const Problem<TH, TW>& p, const Block& b, int64_t k0, int64_t k1, float* acc) {
  const int64_t J = p.J, r = p.r, ld = J + 1;
  const int64_t groups = (b.rows + 3) / 4;
  const TW* A = p.A + b.n * p.d * J;
  const float* mu = p.mu + b.n * p.d;
  std::memset(acc, 0, sizeof(float) * kMaxRows * ld);
  const TH* hrow[kMaxRows];
  for (int64_t i = 0; i < b.rows; ++i) hrow[i] = p.h + p.order[b.first + i] * p.d;
  float hcsq[kMaxRows] = {0.f};
  // Raw and centred rows, [group][k][4], for one chunk.
  std::vector<float> xh(groups * kChunkRows * 4), xc(groups * kChunkRows * 4);
  std::vector<float> abuf(std::is_same<TW, float>::value ? 0 : kChunkRows * J);

  for (int64_t kc = k0; kc < k1; kc += kChunkRows) {
    const int64_t kn = std::min(kChunkRows, k1 - kc);
    for (int64_t g = 0; g < groups; ++g) {
      for (int i = 0; i < 4; ++i) {
        const int64_t row = g * 4 + i;
        float* xhg = xh.data() + g * kChunkRows * 4 + i;
        float* xcg = xc.data() + g * kChunkRows * 4 + i;
        if (row >= b.rows) {
          for (int64_t k = 0; k < kn; ++k) xhg[4 * k] = xcg[4 * k] = 0.f;
          continue;
        }
        float q = 0.f;
        for (int64_t k = 0; k < kn; ++k) {
          const float x = to_f(hrow[row][kc + k]), cx = x - mu[kc + k];
          xhg[4 * k] = x;
          xcg[4 * k] = cx;
          q += cx * cx;
        }
        hcsq[row] += q;
      }
    }
    const float* Ak;
    if constexpr (std::is_same<TW, float>::value) {
      Ak = A + kc * J;
    } else {
      convert_row(abuf.data(), A + kc * J, kn * J);
      Ak = abuf.data();
    }
    for (int64_t g = 0; g < groups; ++g) {
      float* accg = acc + g * 4 * ld;
      // Gate-subspace columns see the centred rows, routing and MLP columns the raw rows.
      tile_columns(Ak, J, xc.data() + g * kChunkRows * 4, kn, accg, ld, 0, r);
      tile_columns(Ak, J, xh.data() + g * kChunkRows * 4, kn, accg, ld, r, J);
    }
  }
  for (int64_t i = 0; i < b.rows; ++i) acc[i * ld + J] = hcsq[i];
}
#else
#define FS_HAVE_TILED 0
#endif

// Phase 3 for one (block, column chunk) task. MODE 0: write h's dtype with the select; MODE 1:
// write the fp32 vector. coef [rows, K + m], scale [rows].
template <int MODE, class TH, class TW>
FS_INLINE void phase3_task(const Problem<TH, TW>& p, const Block& b, int64_t c0, int64_t c1, const float* coef,
                           const float* scale, void* out) {
  const int64_t d = p.d, KM = p.K + p.m, w = c1 - c0;
  float vbuf[kMaxRows * kColChunk];
  float bbuf[std::is_same<TW, float>::value ? 1 : 4 * kColChunk];
  bool any = false;
  for (int64_t i = 0; i < b.rows; ++i) any |= scale[i] != 0.f;
  if (any) {
    std::memset(vbuf, 0, sizeof(float) * b.rows * kColChunk);
    const TW* Bn = p.B + b.n * KM * d;
    int64_t j = 0;
    for (; j < KM; j += 4) {
      const int nq = static_cast<int>(std::min<int64_t>(4, KM - j));
      const float* bq[4] = {};
      for (int q = 0; q < nq; ++q) {
        if constexpr (std::is_same<TW, float>::value) {
          bq[q] = Bn + (j + q) * d + c0;
        } else {
          convert_row(bbuf + q * kColChunk, Bn + (j + q) * d + c0, w);
          bq[q] = bbuf + q * kColChunk;
        }
      }
      for (int q = nq; q < 4; ++q) bq[q] = bq[0];  // weight 0 below: keeps one fused loop for the tail
      for (int64_t i = 0; i < b.rows; ++i) {
        if (scale[i] == 0.f) continue;
        const float* ci = coef + i * KM + j;
        axpy4(vbuf + i * kColChunk, bq[0], bq[1], bq[2], bq[3], ci[0], nq > 1 ? ci[1] : 0.f,
              nq > 2 ? ci[2] : 0.f, nq > 3 ? ci[3] : 0.f, w);
      }
    }
  }
  for (int64_t i = 0; i < b.rows; ++i) {
    const int64_t t = p.order[b.first + i];
    const float s = scale[i];
    const float* v = vbuf + i * kColChunk;
    if (MODE == 1) {
      float* o = static_cast<float*>(out) + t * d + c0;
      if (s == 0.f) {
        std::memset(o, 0, sizeof(float) * w);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) o[j] = s * v[j];
      }
    } else {
      const TH* hp = p.h + t * d + c0;
      TH* o = static_cast<TH*>(out) + t * d + c0;
      if (s == 0.f) {
        std::memcpy(o, hp, sizeof(TH) * w);
      } else {
        for (int64_t j = 0; j < w; ++j) {
          const float y = s * v[j];
          o[j] = (y == 0.f) ? hp[j] : from_f<TH>(to_f(hp[j]) + y);
        }
      }
    }
  }
}

// Baseline and AVX2 instantiations of the two heavy phases.
// Blocks of ≥ 3 rows take the register-tiled path; 1–2 rows (decode) the streaming axpy path.
template <class TH, class TW>
FS_INLINE void phase1_any(const Problem<TH, TW>& p, const Block& b, int64_t k0, int64_t k1, float* acc) {
#if FS_HAVE_TILED
  if (b.rows >= 3) {
    phase1_task_tiled(p, b, k0, k1, acc);
    return;
  }
#endif
  phase1_task(p, b, k0, k1, acc);
}

template <class TH, class TW>
void phase1_base(const Problem<TH, TW>& p, const Block& b, int64_t k0, int64_t k1, float* acc) {
  phase1_any(p, b, k0, k1, acc);
}
template <int MODE, class TH, class TW>
void phase3_base(const Problem<TH, TW>& p, const Block& b, int64_t c0, int64_t c1, const float* coef,
                 const float* scale, void* out) {
  phase3_task<MODE>(p, b, c0, c1, coef, scale, out);
}
#if FS_HAVE_AVX2_CLONE
template <class TH, class TW>
FS_TARGET_AVX2 void phase1_avx2(const Problem<TH, TW>& p, const Block& b, int64_t k0, int64_t k1, float* acc) {
  phase1_any(p, b, k0, k1, acc);
}
template <int MODE, class TH, class TW>
FS_TARGET_AVX2 void phase3_avx2(const Problem<TH, TW>& p, const Block& b, int64_t c0, int64_t c1,
                                const float* coef, const float* scale, void* out) {
  phase3_task<MODE>(p, b, c0, c1, coef, scale, out);
}
#endif

bool use_avx2() {
#if FS_HAVE_AVX2_CLONE
  static const bool hw = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  const char* env = std::getenv("FINESTEER_CPU_ISA");  // read per call so tests can switch paths
  if (env != nullptr && std::strcmp(env, "baseline") == 0) return false;
  return hw;
#else
  return false;
#endif
}

// Phase 2: gate, softmax, relu and W2 for one row. acc [J + 1] (reduced), coef [K + m] out.
template <class TH, class TW>
float epilogue_row(const Problem<TH, TW>& p, int64_t n, const float* acc, float* coef) {
  const int64_t r = p.r, K = p.K, H = p.H, m = p.m;
  float pn = 0.f;
  for (int64_t j = 0; j < r; ++j) pn += acc[j] * acc[j];
  const float score = pn / (acc[p.J] + p.eps);
  const float scale = p.lam[n] * gate_value(p.mode[n], score, p.thr[n], p.temp[n]);
  if (scale == 0.f) return 0.f;  // closed gate or λ = 0: the vector is exactly zero

  const float* logit = acc + r;
  const float* cn = p.c + n * K;
  float mx = -INFINITY;
  for (int64_t k = 0; k < K; ++k) mx = std::max(mx, logit[k] + cn[k]);
  float sum = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    coef[k] = std::exp(logit[k] + cn[k] - mx);
    sum += coef[k];
  }
  for (int64_t k = 0; k < K; ++k) coef[k] /= sum;

  const float* pre = acc + r + K;
  const float* b1 = p.b1 + n * H;
  std::vector<float> z(H);
  for (int64_t i = 0; i < H; ++i) {
    const float u = pre[i] + b1[i];
    z[i] = u > 0.f ? u : (u == u ? 0.f : u);  // relu that keeps NaN, as torch.relu does
  }
  const TW* W2 = p.W2 + n * m * H;
  for (int64_t q = 0; q < m; ++q) {
    float s = 0.f;
    for (int64_t i = 0; i < H; ++i) s += to_f(W2[q * H + i]) * z[i];
    coef[K + q] = s + p.b2[n * m + q];
  }
  return scale;
}

// Runs the three phases. MODE 0: out is h's dtype (token mode); MODE 1: out is fp32 vectors.
template <int MODE, class TH, class TW>
void run_steer(Problem<TH, TW> p, const int64_t* idx, void* out) {
  const int64_t T = p.T, N = p.N, d = p.d, J = p.J, KM = p.K + p.m;

  // Group rows by steerer (counting sort); rows with index −1 (or out of range) form the "none" list.
  auto steerer_of = [&](int64_t t) { return idx ? entry_or_none(idx[t], N) : int64_t{0}; };
  std::vector<int64_t> count(N + 1, 0), order(T);
  for (int64_t t = 0; t < T; ++t) ++count[steerer_of(t) + 1];
  std::vector<int64_t> start(N + 2, 0);
  for (int64_t n = 0; n <= N; ++n) start[n + 1] = start[n] + count[n];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < T; ++t) order[fill[steerer_of(t) + 1]++] = t;
  }
  p.order = order.data();

  // Rows with index −1: unchanged (token mode) or zero vectors.
  const int64_t nnone = count[0];
  const bool serial = (T - nnone) * d * J < kSerialWork || at::get_num_threads() <= 1;
  if (nnone) {
    for_range(serial, nnone, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t t = order[i];
        if (MODE == 1) {
          std::memset(static_cast<float*>(out) + t * d, 0, sizeof(float) * d);
        } else {
          std::memcpy(static_cast<TH*>(out) + t * d, p.h + t * d, sizeof(TH) * d);
        }
      }
    });
  }

  std::vector<Block> blocks;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t o = start[n + 1]; o < start[n + 2]; o += kMaxRows) {
      blocks.push_back({n, o, std::min<int64_t>(kMaxRows, start[n + 2] - o)});
    }
  }
  const int64_t nb = static_cast<int64_t>(blocks.size());
  if (nb == 0) return;

  // Split d across threads when there are fewer row blocks than threads (decode).
  const int64_t nthreads = serial ? 1 : std::max<int64_t>(1, at::get_num_threads());
  int64_t nsplit = 1;
  if (nb < nthreads) nsplit = std::min<int64_t>((nthreads + nb - 1) / nb, std::max<int64_t>(1, d / 256));
  int64_t kstep = (d + nsplit - 1) / nsplit;
  kstep = (kstep + 3) / 4 * 4;  // keep the four-row groups aligned
  nsplit = (d + kstep - 1) / kstep;
  const int64_t ld = J + 1, per_task = kMaxRows * ld;
  std::vector<float> part(static_cast<size_t>(nb * nsplit * per_task));
  const bool avx2 = use_avx2();

  for_range(serial, nb * nsplit, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const Block& b = blocks[task / nsplit];
      const int64_t s = task % nsplit, k0 = s * kstep, k1 = std::min(d, k0 + kstep);
      float* acc = part.data() + task * per_task;
#if FS_HAVE_AVX2_CLONE
      if (avx2) {
        phase1_avx2(p, b, k0, k1, acc);
        continue;
      }
#endif
      phase1_base(p, b, k0, k1, acc);
    }
  });

  // Phase 2: reduce the d splits, then the per-row epilogue.
  std::vector<float> coef(static_cast<size_t>(nb * kMaxRows * KM)), scale(static_cast<size_t>(nb * kMaxRows));
  for_range(serial, nb, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t bi = lo; bi < hi; ++bi) {
      const Block& b = blocks[bi];
      float* acc0 = part.data() + bi * nsplit * per_task;
      for (int64_t s = 1; s < nsplit; ++s) {
        const float* accs = acc0 + s * per_task;
        for (int64_t e = 0; e < b.rows * ld; ++e) acc0[e] += accs[e];
      }
      for (int64_t i = 0; i < b.rows; ++i) {
        scale[bi * kMaxRows + i] = epilogue_row(p, b.n, acc0 + i * ld, coef.data() + (bi * kMaxRows + i) * KM);
      }
    }
  });

  // Phase 3: out = h + scale · coef @ B, column chunks over threads.
  const int64_t nchunk = (d + kColChunk - 1) / kColChunk;
  // Even in a parallel call this phase is small below 2^18 multiply-adds: run it on the calling
  // thread rather than pay a second fork/join (see kSerialWork).
  const int64_t work3 = (T - nnone) * d * KM;
  for_range(serial || work3 < (1 << 18), nb * nchunk, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t bi = task / nchunk, c0 = (task % nchunk) * kColChunk, c1 = std::min(d, c0 + kColChunk);
      const float* cf = coef.data() + bi * kMaxRows * KM;
      const float* sc = scale.data() + bi * kMaxRows;
#if FS_HAVE_AVX2_CLONE
      if (avx2) {
        phase3_avx2<MODE>(p, blocks[bi], c0, c1, cf, sc, out);
        continue;
      }
#endif
      phase3_base<MODE>(p, blocks[bi], c0, c1, cf, sc, out);
    }
  });
}

template <class F>
void dispatch_io(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "finesteer: unsupported ", what, " dtype ", t);
  }
}

template <int MODE>
at::Tensor steer_cpu(FS_STEER_PARAMS_H(h_in)) {
  const BankDims s = check_steer_args(h_in, A, B, W2, mu, c, b1, b2, gate_mode, threshold, temperature,
                                      strength, index);
  TORCH_CHECK(h_in.device().is_cpu(), "finesteer: the CPU kernel got h on ", h_in.device());
  const at::Tensor h = h_in.contiguous();
  at::Tensor out = at::empty({s.T, s.d}, h.options().dtype(MODE == 1 ? at::kFloat : h.scalar_type()));
  if (s.T == 0 || s.d == 0) {
    if (MODE == 1 && s.T) out.zero_();
    return out;
  }
  at::Tensor idx;
  if (index.has_value()) idx = index->to(at::kLong).contiguous();
  dispatch_io(h.scalar_type(), "h", [&](auto th) {
    using TH = decltype(th);
    dispatch_io(A.scalar_type(), "weight", [&](auto tw) {
      using TW = decltype(tw);
      Problem<TH, TW> p;
      p.h = h.data_ptr<TH>();
      p.A = A.data_ptr<TW>();
      p.B = B.data_ptr<TW>();
      p.W2 = W2.data_ptr<TW>();
      p.mu = mu.data_ptr<float>();
      p.c = c.data_ptr<float>();
      p.b1 = b1.data_ptr<float>();
      p.b2 = b2.data_ptr<float>();
      p.thr = threshold.data_ptr<float>();
      p.temp = temperature.data_ptr<float>();
      p.lam = strength.data_ptr<float>();
      p.mode = gate_mode.data_ptr<int32_t>();
      p.T = s.T; p.d = s.d; p.N = s.N; p.J = s.J; p.r = s.r; p.K = s.K; p.H = s.H; p.m = s.m;
      p.eps = static_cast<float>(eps);
      p.order = nullptr;
      run_steer<MODE>(p, idx.defined() ? idx.data_ptr<int64_t>() : nullptr, out.data_ptr());
    });
  });
  return out;
}

at::Tensor steering_vectors_cpu(FS_STEER_PARAMS) { return steer_cpu<1>(FS_STEER_ARGS); }
at::Tensor steer_tokens_cpu(FS_STEER_PARAMS) { return steer_cpu<0>(FS_STEER_ARGS); }

at::Tensor add_vectors_cpu(const at::Tensor& h_in, const at::Tensor& vectors_in, const c10::optional<at::Tensor>& slot) {
  check_add_args(h_in, vectors_in, slot);
  TORCH_CHECK(h_in.device().is_cpu(), "finesteer.add_vectors: the CPU kernel got h on ", h_in.device());
  const at::Tensor h = h_in.contiguous(), vectors = vectors_in.contiguous();
  const int64_t T = h.size(0), d = h.size(1), S = vectors.size(0);
  at::Tensor out = at::empty_like(h);
  at::Tensor sl;
  if (slot.has_value()) sl = slot->to(at::kLong).contiguous();
  const int64_t* sp = sl.defined() ? sl.data_ptr<int64_t>() : nullptr;
  const float* V = vectors.data_ptr<float>();
  dispatch_io(h.scalar_type(), "h", [&](auto th) {
    using TH = decltype(th);
    const TH* hp = h.data_ptr<TH>();
    TH* op = out.data_ptr<TH>();
    const bool serial = T * d < kSerialAddElems || at::get_num_threads() <= 1;
    for_range(serial, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t sv = sp ? entry_or_none(sp[t], S) : t;
        const TH* hr = hp + t * d;
        TH* orow = op + t * d;
        if (sv < 0) {
          std::memcpy(orow, hr, sizeof(TH) * d);
          continue;
        }
        const float* v = V + sv * d;
        for (int64_t j = 0; j < d; ++j) orow[j] = (v[j] == 0.f) ? hr[j] : from_f<TH>(to_f(hr[j]) + v[j]);
      }
    });
  });
  return out;
}

}  // namespace

FS_REGISTER_KERNELS(CPU, cpu)

}  // namespace finesteer
