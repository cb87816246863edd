// Operator schemas of the fused steering operator (DESIGN §4), shared by the CPU and CUDA builds.
//
// The schemas live in their own namespace, ``finesteer_ext``, so that they can never collide with
// Python-side ``torch.library`` registrations under ``finesteer``. The kernels register with
// TORCH_LIBRARY_IMPL(finesteer_ext, CPU / CUDA, ...) in cpu/steer_cpu.cpp and
// cuda/steer_cuda_binding.cpp. Because every op has a schema, torch.compile and CUDA graphs see
// them as ordinary dispatcher ops (their fake kernels are registered by finesteer/fused/native.py).
// The Triton ops (torch.ops.finesteer_triton) take exactly the same arguments: the schema text below
// is also finesteer/fused/op_schema.py's SCHEMAS, and tests/test_backends.py checks the two agree.
//
// Arguments follow finesteer.bank.SteeringBank (J = r + K + H):
//   h [T, d] fp32/bf16/fp16; A [N, d, J], B [N, K + m, d], W2 [N, m, H] in one weight dtype;
//   mu [N, d], c [N, K], b1 [N, H], b2 [N, m], threshold/temperature/strength [N] fp32;
//   gate_mode [N] int32; index [T] int32/int64 or None (every row uses steerer 0); eps = GATE_EPS.
// Index and slot values outside their range act as −1 (contract in finesteer/reference.py).
#include <torch/library.h>

TORCH_LIBRARY(finesteer_ext, m) {
  m.def(
      "steering_vectors(Tensor h, Tensor A, Tensor B, Tensor W2, Tensor mu, Tensor c, Tensor b1, "
      "Tensor b2, Tensor gate_mode, Tensor threshold, Tensor temperature, Tensor strength, "
      "Tensor? index, float eps) -> Tensor");
  m.def(
      "steer_tokens(Tensor h, Tensor A, Tensor B, Tensor W2, Tensor mu, Tensor c, Tensor b1, "
      "Tensor b2, Tensor gate_mode, Tensor threshold, Tensor temperature, Tensor strength, "
      "Tensor? index, float eps) -> Tensor");
  m.def("add_vectors(Tensor h, Tensor vectors, Tensor? slot) -> Tensor");
}

#ifdef FINESTEER_PY_MODULE
// setup.py builds this file into the importable module ``finesteer._C``; importing it runs the
// registrations above. The module itself is empty (the ops are reached through torch.ops).
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "finesteer fused ops (see torch.ops.finesteer_ext)",
                            -1, nullptr};
  return PyModule_Create(&def);
}
#endif
