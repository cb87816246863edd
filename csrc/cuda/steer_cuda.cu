// CUDA launchers of the fused steering operator: launch geometry and dtype dispatch.
// The kernels are in steer_kernels.cuh; the torch binding is steer_cuda_binding.cpp. This file
// includes no torch header, so `nvcc -c` with the CUDA toolkit alone compiles it (that is what
// tests/test_nvcc_compile.py checks on machines without a GPU).
//
// Build and test on a GPU machine (CUDA torch + nvcc):
//   pip install -e . --no-build-isolation      # builds finesteer._C with these kernels, or
//   python -m finesteer._ext                     # builds them at first use into the torch cache
//   python -m pytest tests/test_cuda.py -q       # kernels vs finesteer.reference
//   python benchmarks/bench_steer.py             # timings, bandwidth, results JSON
#include <cuda_runtime.h>

#include <algorithm>

#include "steer_cuda.h"
#include "steer_kernels.cuh"

namespace finesteer {
namespace cuda {

namespace {

int sm_count(int device) {
  static int cache[64] = {0};  // benign race: every writer stores the same value
  if (device < 0 || device >= 64) device = 0;
  if (cache[device] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v <= 0) {
      cudaGetLastError();  // a failed query is not sticky; clear it so the next check is clean
      v = 80;
    }
    cache[device] = v;
  }
  return cache[device];
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f(TH{}) with the C++ type of a DType (static switch in the flash-attention manner).
template <typename F>
cudaError_t dtype_switch(DType t, F&& f) {
  switch (t) {
    case DType::F32: return f(float{});
    case DType::BF16: return f(__nv_bfloat16{});
    case DType::F16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

template <int TR, bool VECTORS, typename TH, typename TW>
cudaError_t launch_typed(const SteerParams& p, const SteerPlan& plan, cudaStream_t stream) {
  const int64_t ntiles = cdiv(p.T, TR);
  const dim3 g1(static_cast<unsigned>(plan.splits), static_cast<unsigned>(std::min<int64_t>(ntiles, 65535)),
                static_cast<unsigned>(p.N));
  _steer_partial_kernel<TR, TH, TW><<<g1, plan.threads1, 0, stream>>>(p, plan.rows_per_split);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t col_chunk = cdiv(p.d, plan.col_chunks);
  const dim3 g2(static_cast<unsigned>(plan.col_chunks), static_cast<unsigned>(std::min<int64_t>(p.T, 65535)));
  const size_t smem = static_cast<size_t>(steer_phase2_smem_bytes(p.J, p.K, p.m));
  _steer_apply_kernel<VECTORS, TH, TW><<<g2, kApplyThreads, smem, stream>>>(p, plan.splits, col_chunk);
  return cudaGetLastError();
}

template <bool VECTORS, typename TH, typename TW>
cudaError_t launch_rows(const SteerParams& p, const SteerPlan& plan, cudaStream_t stream) {
  switch (plan.rows_per_tile) {
    case 1: return launch_typed<1, VECTORS, TH, TW>(p, plan, stream);
    case 2: return launch_typed<2, VECTORS, TH, TW>(p, plan, stream);
    case 4: return launch_typed<4, VECTORS, TH, TW>(p, plan, stream);
    case 8: return launch_typed<8, VECTORS, TH, TW>(p, plan, stream);
    case 16: return launch_typed<16, VECTORS, TH, TW>(p, plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

SteerPlan plan_steer(int64_t T, int64_t d, int64_t J, int device) {
  SteerPlan plan;
  const int64_t sms = sm_count(device);
  int tr = 1;
  while (tr < T && tr < 16) tr *= 2;
  plan.rows_per_tile = tr;
  const int64_t ntiles = std::min<int64_t>(cdiv(std::max<int64_t>(T, 1), tr), 65535);
  const int64_t rows = std::min<int64_t>(std::max<int64_t>(T, 1), 65535);
  // Phase 2: enough blocks to cover the GPU at decode, column chunks of at least 256.
  plan.col_chunks = std::max<int64_t>(1, std::min(cdiv(2 * sms, rows), cdiv(d, 256)));
  // Phase 1: about two blocks per SM in total, at least one staged chunk of d rows per block,
  // and a cap on the partial sums every phase-2 block re-reduces (rows · chunks · splits).
  int64_t splits = std::max<int64_t>(1, std::min(cdiv(2 * sms, ntiles), cdiv(d, kChunkK)));
  while (splits > 1 && rows * plan.col_chunks * splits > 8192) splits = cdiv(splits, 2);
  plan.rows_per_split = std::max<int64_t>(1, cdiv(d, splits));
  plan.splits = std::max<int64_t>(1, cdiv(d, plan.rows_per_split));  // every split has ≥ 1 row
  plan.threads1 = static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(64, cdiv(J, 32) * 32)));
  return plan;
}

int64_t steer_phase2_smem_bytes(int64_t J, int64_t K, int64_t m) {
  return static_cast<int64_t>(sizeof(float)) * (J + 1 + K + m);
}

cudaError_t launch_steer(const SteerParams& p, const SteerPlan& plan, bool vectors_out, cudaStream_t stream) {
  if (p.T == 0 || p.d == 0) return cudaSuccess;
  return dtype_switch(p.h_dtype, [&](auto th) {
    using TH = decltype(th);
    return dtype_switch(p.w_dtype, [&](auto tw) {
      using TW = decltype(tw);
      return vectors_out ? launch_rows<true, TH, TW>(p, plan, stream) : launch_rows<false, TH, TW>(p, plan, stream);
    });
  });
}

cudaError_t launch_add_vectors(const AddParams& p, cudaStream_t stream) {
  const int64_t total = p.T * p.d;
  if (total == 0) return cudaSuccess;
  int device = 0;
  cudaGetDevice(&device);
  const int threads = 256;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(cdiv(total, threads), 8 * sm_count(device)));
  return dtype_switch(p.h_dtype, [&](auto th) {
    using TH = decltype(th);
    _add_vectors_kernel<TH><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace finesteer
