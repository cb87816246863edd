// Host interface of the CUDA kernels (csrc/cuda/steer_cuda.cu). Plain C++ over raw pointers and a
// cudaStream_t: no torch types, so the .cu files build with the CUDA toolkit alone and the torch
// binding (steer_cuda_binding.cpp) is the only file that sees both worlds.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace finesteer {
namespace cuda {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// One call of the fused operator. Layout as finesteer.bank.SteeringBank (J = r + K + H); every
// pointer is contiguous except h, whose rows are ldh elements apart (last dim contiguous).
struct SteerParams {
  const void* h;       // [T, ldh] in h_dtype
  int64_t ldh;
  const void* A;       // [N, d, J]   w_dtype
  const void* B;       // [N, K + m, d]
  const void* W2;      // [N, m, H]
  const float* mu;     // [N, d]
  const float* c;      // [N, K]
  const float* b1;     // [N, H]
  const float* b2;     // [N, m]
  const float* threshold;    // [N]
  const float* temperature;  // [N]
  const float* strength;     // [N]
  const int32_t* gate_mode;  // [N]
  const void* index;   // [T] int32 or int64 (index_is_64), or nullptr: every row uses steerer 0
  int index_is_64;
  void* out;           // [T, d]: h_dtype (token mode) or fp32 (steering vectors)
  float* work;         // [splits, T, J + 1] fp32 partial sums (plan.splits)
  int64_t T, d, N, J, r, K, H, m;
  float eps;
  DType h_dtype, w_dtype;
};

// Launch geometry, decided from the shapes and the device's SM count (see steer_cuda.cu).
struct SteerPlan {
  int rows_per_tile;   // TR: rows of h sharing one read of A in phase 1 (1, 2, 4, 8, 16)
  int64_t splits;      // S: blocks along d in phase 1
  int64_t rows_per_split;  // d rows of A per phase-1 block
  int64_t col_chunks;  // phase-2 blocks along d per row
  int threads1;        // phase-1 block size
};

SteerPlan plan_steer(int64_t T, int64_t d, int64_t J, int device);

// Bytes of dynamic shared memory phase 2 needs; the binding checks it against the 48 KiB limit.
int64_t steer_phase2_smem_bytes(int64_t J, int64_t K, int64_t m);

// vectors_out = false: out = steered h (h_dtype); true: out = fp32 steering vectors.
cudaError_t launch_steer(const SteerParams& p, const SteerPlan& plan, bool vectors_out, cudaStream_t stream);

struct AddParams {
  const void* h;     // [T, ldh]
  int64_t ldh;
  const float* vectors;  // [S, d]
  const void* slot;  // [T] int32/int64 or nullptr (row t takes vector t)
  int slot_is_64;
  void* out;         // [T, d] h_dtype
  int64_t T, d, S;
  DType h_dtype;
};

cudaError_t launch_add_vectors(const AddParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace finesteer
