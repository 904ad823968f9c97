// Fused weighted masked RMSE of Astromer (SPEC.md section 4), CUDA version. Same contract as
// cpu/weighted_rmse.h, with device pointers. The kernel source is checked on the CPU against
// float64 through python_tests/test_cuda_emulated.py; GPU runs are in bench/RESULTS.md.
//
// Two launches on one stream: (1) one warp per window writes the per-window partial (mse_b, has_b)
// into `workspace` and the backward direction `dir`; (2) one block sums the partials in a fixed
// order (per-thread strided double sums, then a shared-memory tree) and writes loss and scale.
// No atomics anywhere, so the result is bitwise reproducible run to run.
// This header deliberately includes no CUDA header (the host-compiled bindings include it).
#pragma once

#include <cstdint>

namespace astromer_fast {
namespace cuda {

struct WeightedRmseArgs {
  const void* pred = nullptr;            // [rows, length], device, float32 or bfloat16 (pred_bf16)
  bool pred_bf16 = false;
  const float* target = nullptr;         // [rows, length], device
  const float* err = nullptr;            // [rows, length], device, or null (weights 1 on valid)
  const std::uint8_t* probed = nullptr;  // [rows, length], device
  const std::uint8_t* valid = nullptr;   // [rows, length], device, or null = probed
  std::int64_t rows = 0;
  std::int64_t length = 0;
  float* workspace = nullptr;            // [2 * rows] floats, device (per-window partials)
  float* loss = nullptr;                 // [1], device
  float* scale = nullptr;                // [1], device, or null
  float* dir = nullptr;                  // [rows, length], device, or null
};

// Enqueues the two kernels on `stream` (a cudaStream_t; 0 = legacy default stream) on `device`.
// Returns nullptr on success, otherwise a static message. Does not synchronise.
const char* weighted_rmse_forward(const WeightedRmseArgs& args, int device, void* stream);

}  // namespace cuda
}  // namespace astromer_fast
