// Runs the weighted-RMSE kernels of csrc/cuda/weighted_rmse_kernels.cuh on the CPU through
// emu_cuda.h, with the launch geometry of weighted_rmse.cu for a GPU with `sms` multiprocessors
// (a small `sms` makes the windows kernel's grid-stride loop take several turns). Host arrays:
// bf16 pred as uint16 bit patterns, masks as uint8. Built and loaded by
// python_tests/test_cuda_emulated.py (ctypes). Returns nullptr or an error message.
#include "emu_cuda.h"

#include <algorithm>

// `threadIdx.x < s` (unsigned vs int, s > 0) in the reduction: correct, and nvcc does not warn
// about it; silenced for this include only so that every other warning still fails the test.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
#include "cuda/weighted_rmse_kernels.cuh"
#pragma GCC diagnostic pop

namespace k = astromer_fast::cuda;

extern "C" {

// workspace: 2 * rows floats (the per-window partials).
const char* wrmse_emu_forward(const void* pred, int pred_bf16, const float* target,
                              const float* err, const std::uint8_t* probed,
                              const std::uint8_t* valid, long long rows, long long length,
                              float* workspace, float* loss, float* scale, float* dir, int sms) {
  float2* part = reinterpret_cast<float2*>(workspace);
  if (rows > 0) {
    if (length == 0) {
      std::fill(workspace, workspace + 2 * rows, 0.0f);  // the host code's cudaMemsetAsync
    } else {
      // detail::capped_grid(wanted, 16, sms) of common.cuh (which needs the CUDA runtime).
      const long long per_block = k::kStage1Threads / k::kWarp;
      const long long wanted = (rows + per_block - 1) / per_block;
      const long long blocks = std::max(1LL, std::min(wanted, 16LL * std::max(sms, 1)));
      const std::uint8_t* v = valid ? valid : probed;
      const char* e =
          pred_bf16
              ? emu::launch(static_cast<unsigned>(blocks), k::kStage1Threads, 0,
                            k::weighted_rmse_windows<true>, pred, target, err, probed, v, rows,
                            length, part, dir)
              : emu::launch(static_cast<unsigned>(blocks), k::kStage1Threads, 0,
                            k::weighted_rmse_windows<false>, pred, target, err, probed, v, rows,
                            length, part, dir);
      if (e) return e;
    }
  }
  return emu::launch(1, k::kStage2Threads, 0, k::weighted_rmse_reduce,
                     static_cast<const float2*>(part), rows, loss, scale);
}

}  // extern "C"
