// Rules of the steering operator that every native kernel (cpu/ and cuda/) must apply the same way
// as finesteer/reference.py, which states them. Torch-free and usable from device code, so the
// .cu files include it as well as the CPU kernel.
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define FS_HOST_DEVICE __host__ __device__
#else
#define FS_HOST_DEVICE
#endif

namespace finesteer {

// Codes of SteeringBank.gate_mode. finesteer/_constants.py (GATE_OFF, GATE_HARD, GATE_SOFT) holds
// the same values; tests/test_backends.py checks that the two agree. As in the reference, a code
// that is neither kGateOff nor kGateHard is the soft gate.
enum GateMode : int32_t { kGateOff = 0, kGateHard = 1, kGateSoft = 2 };

// The gate g(score) of DESIGN §2 for one row: off 1, hard 1[score > tau], soft
// sigmoid((score − tau) / temperature), computed in fp32 like the reference.
FS_HOST_DEVICE inline float gate_value(int32_t mode, float score, float tau, float temperature) {
  if (mode == kGateOff) return 1.f;
  if (mode == kGateHard) return score > tau ? 1.f : 0.f;
  return 1.f / (1.f + expf(-((score - tau) / temperature)));
}

// Bank index / slot contract: a value in [0, n) selects entry `value`; every other value (−1,
// any other negative number, n or more) means "none" and leaves the row unchanged. Never an
// error: checking values would need a host–device sync on the GPU.
FS_HOST_DEVICE inline int64_t entry_or_none(int64_t value, int64_t n) { return (value >= 0 && value < n) ? value : -1; }

}  // namespace finesteer
