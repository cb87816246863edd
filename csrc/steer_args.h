// Argument validation shared by the CPU and CUDA bindings (flash-attention style: readable
// messages naming the argument and the expected shape/dtype, before any dispatch). A wrong dtype
// raises TypeError in Python (TORCH_CHECK_TYPE), a wrong shape, device or layout ValueError
// (TORCH_CHECK_VALUE): the same exception types as the Triton launchers, so one conformance suite
// checks every backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <string>

#define FS_CHECK_DEVICE(x, dev)                                                                  \
  TORCH_CHECK_VALUE((x).device() == (dev), "finesteer: ", #x, " is on ", (x).device(), " but h is on ", \
              (dev), "; move the bank/index to the same device as the hidden states")
#define FS_CHECK_CONTIGUOUS(x) \
  TORCH_CHECK_VALUE((x).is_contiguous(), "finesteer: ", #x, " must be contiguous (SteeringBank tensors are)")
#define FS_CHECK_DTYPE(x, dt) \
  TORCH_CHECK_TYPE((x).scalar_type() == (dt), "finesteer: ", #x, " must be ", (dt), ", got ", (x).scalar_type())
#define FS_CHECK_SHAPE(x, ...)                                                                   \
  TORCH_CHECK_VALUE((x).sizes() == at::IntArrayRef({__VA_ARGS__}), "finesteer: ", #x, " has shape ", \
              (x).sizes(), ", expected ", at::IntArrayRef({__VA_ARGS__}))

// Parameters and arguments of the steering_vectors / steer_tokens ops (schema in ops.cpp), so that
// each binding's signatures are written once: `at::Tensor f(FS_STEER_PARAMS) { return g(FS_STEER_ARGS); }`;
// FS_STEER_PARAMS_H(name) names the hidden-states parameter `name` instead of `h`.
#define FS_STEER_PARAMS_H(h_name)                                                                          \
  const at::Tensor &h_name, const at::Tensor &A, const at::Tensor &B, const at::Tensor &W2,                 \
      const at::Tensor &mu, const at::Tensor &c, const at::Tensor &b1, const at::Tensor &b2,                \
      const at::Tensor &gate_mode, const at::Tensor &threshold, const at::Tensor &temperature,              \
      const at::Tensor &strength, const c10::optional<at::Tensor> &index, double eps
#define FS_STEER_PARAMS FS_STEER_PARAMS_H(h)
#define FS_STEER_ARGS h, A, B, W2, mu, c, b1, b2, gate_mode, threshold, temperature, strength, index, eps

// Registers steering_vectors_<suffix>, steer_tokens_<suffix> and add_vectors_<suffix> as the
// DEVICE kernels of the three ops (schemas in ops.cpp). Used once per binding, at namespace scope.
#define FS_REGISTER_KERNELS(DEVICE, suffix)                  \
  TORCH_LIBRARY_IMPL(finesteer_ext, DEVICE, m) {             \
    m.impl("steering_vectors", &steering_vectors_##suffix);  \
    m.impl("steer_tokens", &steer_tokens_##suffix);          \
    m.impl("add_vectors", &add_vectors_##suffix);            \
  }

namespace finesteer {

inline bool is_io_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Sizes of one call, read off the packed bank (finesteer.bank.SteeringBank).
struct BankDims {
  int64_t T, d, N, J, r, K, H, m;
};

// Checks h [T, d] and the bank tensors; returns the sizes. h may be non-contiguous (the caller
// makes it contiguous); the bank tensors must already be contiguous.
inline BankDims check_steer_args(const at::Tensor& h, const at::Tensor& A, const at::Tensor& B,
                                 const at::Tensor& W2, const at::Tensor& mu, const at::Tensor& c,
                                 const at::Tensor& b1, const at::Tensor& b2, const at::Tensor& gate_mode,
                                 const at::Tensor& threshold, const at::Tensor& temperature,
                                 const at::Tensor& strength, const c10::optional<at::Tensor>& index) {
  TORCH_CHECK_VALUE(h.dim() == 2, "finesteer: h must be 2-D [T, d], got shape ", h.sizes());
  TORCH_CHECK_TYPE(is_io_dtype(h.scalar_type()), "finesteer: h must be float32/bfloat16/float16, got ",
              h.scalar_type());
  TORCH_CHECK_VALUE(A.dim() == 3, "finesteer: A must be [N, d, J], got shape ", A.sizes());
  TORCH_CHECK_TYPE(is_io_dtype(A.scalar_type()), "finesteer: A must be float32/bfloat16/float16, got ",
              A.scalar_type());
  BankDims s;
  s.T = h.size(0);
  s.d = h.size(1);
  s.N = A.size(0);
  s.J = A.size(2);
  TORCH_CHECK_VALUE(A.size(1) == s.d, "finesteer: hidden size mismatch: h has d = ", s.d, ", bank A has d = ",
              A.size(1));
  TORCH_CHECK_VALUE(c.dim() == 2 && b1.dim() == 2 && b2.dim() == 2,
              "finesteer: c, b1, b2 must be 2-D [N, K], [N, H], [N, m]; got ", c.sizes(), ", ", b1.sizes(),
              ", ", b2.sizes());
  s.K = c.size(1);
  s.H = b1.size(1);
  s.m = b2.size(1);
  s.r = s.J - s.K - s.H;
  TORCH_CHECK_VALUE(s.K >= 1 && s.r >= 0, "finesteer: A has J = ", s.J, " columns but c has K = ", s.K,
              " and b1 has H = ", s.H, "; expected J = r + K + H with r >= 0, K >= 1");
  TORCH_CHECK_VALUE(s.N >= 1, "finesteer: the bank is empty (N = 0)");
  const auto dev = h.device();
  const at::Tensor* weights[] = {&A, &B, &W2};
  const char* wnames[] = {"A", "B", "W2"};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK_TYPE(weights[i]->scalar_type() == A.scalar_type(), "finesteer: ", wnames[i], " has dtype ",
                weights[i]->scalar_type(), " but A has ", A.scalar_type(), "; A, B, W2 share one weight dtype");
  }
  FS_CHECK_SHAPE(B, s.N, s.K + s.m, s.d);
  FS_CHECK_SHAPE(W2, s.N, s.m, s.H);
  FS_CHECK_SHAPE(mu, s.N, s.d);
  FS_CHECK_SHAPE(c, s.N, s.K);
  FS_CHECK_SHAPE(b1, s.N, s.H);
  FS_CHECK_SHAPE(b2, s.N, s.m);
  FS_CHECK_SHAPE(gate_mode, s.N);
  FS_CHECK_SHAPE(threshold, s.N);
  FS_CHECK_SHAPE(temperature, s.N);
  FS_CHECK_SHAPE(strength, s.N);
  for (const at::Tensor* t : {&mu, &c, &b1, &b2, &threshold, &temperature, &strength}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "finesteer: bank vectors (mu, c, b1, b2, threshold, ",
                "temperature, strength) must be float32, got ", t->scalar_type(), " for a tensor of shape ",
                t->sizes());
  }
  FS_CHECK_DTYPE(gate_mode, at::kInt);
  FS_CHECK_DEVICE(A, dev); FS_CHECK_DEVICE(B, dev); FS_CHECK_DEVICE(W2, dev); FS_CHECK_DEVICE(mu, dev);
  FS_CHECK_DEVICE(c, dev); FS_CHECK_DEVICE(b1, dev); FS_CHECK_DEVICE(b2, dev);
  FS_CHECK_DEVICE(gate_mode, dev); FS_CHECK_DEVICE(threshold, dev); FS_CHECK_DEVICE(temperature, dev);
  FS_CHECK_DEVICE(strength, dev);
  FS_CHECK_CONTIGUOUS(A); FS_CHECK_CONTIGUOUS(B); FS_CHECK_CONTIGUOUS(W2); FS_CHECK_CONTIGUOUS(mu);
  FS_CHECK_CONTIGUOUS(c); FS_CHECK_CONTIGUOUS(b1); FS_CHECK_CONTIGUOUS(b2);
  FS_CHECK_CONTIGUOUS(gate_mode); FS_CHECK_CONTIGUOUS(threshold); FS_CHECK_CONTIGUOUS(temperature);
  FS_CHECK_CONTIGUOUS(strength);
  if (index.has_value()) {
    const at::Tensor& idx = *index;
    TORCH_CHECK_TYPE(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong,
                "finesteer: index must be int32 or int64, got ", idx.scalar_type());
    TORCH_CHECK_VALUE(idx.dim() == 1 && idx.size(0) == s.T, "finesteer: index must have shape [T] = [", s.T,
                "], got ", idx.sizes());
    FS_CHECK_DEVICE(idx, dev);
  }
  return s;
}

// Checks add_vectors(h [T, d], vectors [S, d] fp32, slot [T] or None).
inline void check_add_args(const at::Tensor& h, const at::Tensor& vectors, const c10::optional<at::Tensor>& slot) {
  TORCH_CHECK_VALUE(h.dim() == 2, "finesteer.add_vectors: h must be 2-D [T, d], got shape ", h.sizes());
  TORCH_CHECK_TYPE(is_io_dtype(h.scalar_type()), "finesteer.add_vectors: h must be float32/bfloat16/float16, got ",
              h.scalar_type());
  TORCH_CHECK_VALUE(vectors.dim() == 2 && vectors.size(1) == h.size(1), "finesteer.add_vectors: vectors must be [S, ",
              h.size(1), "], got ", vectors.sizes());
  TORCH_CHECK_TYPE(vectors.scalar_type() == at::kFloat, "finesteer.add_vectors: vectors must be float32, got ",
              vectors.scalar_type());
  TORCH_CHECK_VALUE(vectors.device() == h.device(), "finesteer.add_vectors: vectors are on ", vectors.device(),
              ", h on ", h.device());
  if (slot.has_value()) {
    const at::Tensor& s = *slot;
    TORCH_CHECK_TYPE(s.scalar_type() == at::kInt || s.scalar_type() == at::kLong,
                "finesteer.add_vectors: slot must be int32 or int64, got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == h.size(0), "finesteer.add_vectors: slot must have shape [T] = [",
                h.size(0), "], got ", s.sizes());
    TORCH_CHECK_VALUE(s.device() == h.device(), "finesteer.add_vectors: slot is on ", s.device(), ", h on ",
                h.device());
  } else {
    TORCH_CHECK_VALUE(vectors.size(0) == h.size(0), "finesteer.add_vectors: without slot, vectors must have one row ",
                "per row of h (", h.size(0), "), got ", vectors.size(0));
  }
}

}  // namespace finesteer
