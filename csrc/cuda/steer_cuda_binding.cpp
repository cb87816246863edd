// Torch binding of the CUDA kernels: validation with readable messages, then a plain call of the
// launchers in steer_cuda.cu on torch's current stream (so CUDA graphs capture it). Only c10's
// light CUDA headers are used here (stream and device guard), never ATen/cuda/CUDAContext.h,
// which pulls in cuBLAS/cuSPARSE headers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../steer_args.h"
#include "steer_cuda.h"

namespace finesteer {
namespace {

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::F32;
    case at::kBFloat16: return cuda::DType::BF16;
    case at::kHalf: return cuda::DType::F16;
    default: TORCH_CHECK(false, "finesteer: unsupported dtype ", t, " (float32/bfloat16/float16)");
  }
}

// Rows of h must be contiguous; a row stride is allowed (e.g. a slice of a larger buffer).
at::Tensor rows_contiguous(const at::Tensor& h) {
  return (h.size(1) <= 1 || h.stride(1) == 1) && h.stride(0) >= h.size(1) ? h : h.contiguous();
}

template <bool VECTORS>
at::Tensor steer_cuda(FS_STEER_PARAMS_H(h_in)) {
  const BankDims s = check_steer_args(h_in, A, B, W2, mu, c, b1, b2, gate_mode, threshold, temperature,
                                      strength, index);
  TORCH_CHECK(h_in.is_cuda(), "finesteer: the CUDA kernel got h on ", h_in.device());
  TORCH_CHECK(s.N <= 65535, "finesteer: the CUDA kernel serves banks of at most 65535 steerers, got ", s.N);
  TORCH_CHECK(cuda::steer_phase2_smem_bytes(s.J, s.K, s.m) <= 48 * 1024,
              "finesteer: r + K + H + K + m = ", s.J + s.K + s.m, " is too large for the CUDA kernel's shared ",
              "memory (at most ", 48 * 1024 / 4 - 1, ")");
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = rows_contiguous(h_in);
  at::Tensor out = at::empty({s.T, s.d}, h.options().dtype(VECTORS ? at::kFloat : h.scalar_type()));
  if (s.T == 0 || s.d == 0) return out;
  at::Tensor idx;
  if (index.has_value()) idx = index->contiguous();
  const cuda::SteerPlan plan = cuda::plan_steer(s.T, s.d, s.J, h.get_device());
  // Partial sums of phase 1; fully overwritten before they are read, so no zero fill.
  at::Tensor work = at::empty({plan.splits, s.T, s.J + 1}, h.options().dtype(at::kFloat));

  cuda::SteerParams p;
  p.h = h.data_ptr();
  p.ldh = h.stride(0);
  p.A = A.data_ptr();
  p.B = B.data_ptr();
  p.W2 = W2.data_ptr();
  p.mu = mu.data_ptr<float>();
  p.c = c.data_ptr<float>();
  p.b1 = b1.data_ptr<float>();
  p.b2 = b2.data_ptr<float>();
  p.threshold = threshold.data_ptr<float>();
  p.temperature = temperature.data_ptr<float>();
  p.strength = strength.data_ptr<float>();
  p.gate_mode = gate_mode.data_ptr<int32_t>();
  p.index = idx.defined() ? idx.data_ptr() : nullptr;
  p.index_is_64 = idx.defined() && idx.scalar_type() == at::kLong ? 1 : 0;
  p.out = out.data_ptr();
  p.work = work.data_ptr<float>();
  p.T = s.T; p.d = s.d; p.N = s.N; p.J = s.J; p.r = s.r; p.K = s.K; p.H = s.H; p.m = s.m;
  p.eps = static_cast<float>(eps);
  p.h_dtype = to_dtype(h.scalar_type());
  p.w_dtype = to_dtype(A.scalar_type());
  const cudaError_t err = cuda::launch_steer(p, plan, VECTORS, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "finesteer: CUDA kernel launch failed: ", cudaGetErrorString(err),
              " (T=", s.T, ", d=", s.d, ", J=", s.J, ", N=", s.N, ")");
  return out;
}

at::Tensor steering_vectors_cuda(FS_STEER_PARAMS) { return steer_cuda<true>(FS_STEER_ARGS); }
at::Tensor steer_tokens_cuda(FS_STEER_PARAMS) { return steer_cuda<false>(FS_STEER_ARGS); }

at::Tensor add_vectors_cuda(const at::Tensor& h_in, const at::Tensor& vectors_in, const c10::optional<at::Tensor>& slot) {
  check_add_args(h_in, vectors_in, slot);
  TORCH_CHECK(h_in.is_cuda(), "finesteer.add_vectors: the CUDA kernel got h on ", h_in.device());
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = rows_contiguous(h_in);
  const at::Tensor vectors = vectors_in.contiguous();
  at::Tensor out = at::empty({h.size(0), h.size(1)}, h.options());
  at::Tensor sl;
  if (slot.has_value()) sl = slot->contiguous();
  cuda::AddParams p;
  p.h = h.data_ptr();
  p.ldh = h.stride(0);
  p.vectors = vectors.data_ptr<float>();
  p.slot = sl.defined() ? sl.data_ptr() : nullptr;
  p.slot_is_64 = sl.defined() && sl.scalar_type() == at::kLong ? 1 : 0;
  p.out = out.data_ptr();
  p.T = h.size(0);
  p.d = h.size(1);
  p.S = vectors.size(0);
  p.h_dtype = to_dtype(h.scalar_type());
  const cudaError_t err = cuda::launch_add_vectors(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "finesteer.add_vectors: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

FS_REGISTER_KERNELS(CUDA, cuda)

}  // namespace finesteer
