// Host launch code of the weighted RMSE (kernels in weighted_rmse_kernels.cuh; contract in
// cuda/weighted_rmse.h).
//
// Its GPU correctness tests have not run yet (bench/RESULTS.md records what has), which is why
// backends.CUDA_DEFAULTS keeps the reference for this op. Correctness evidence is the CPU emulation of the kernels in python_tests/test_cuda_emulated.py (every case of
// test_kernels_weighted_rmse.py against the float64 oracle, fp32 and bf16 pred, bitwise
// determinism over thread interleavings); it checks the logic, not the hardware.
#include "cuda/weighted_rmse.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>

#include "cuda/common.cuh"
#include "cuda/weighted_rmse_kernels.cuh"

namespace astromer_fast {
namespace cuda {
namespace {

using detail::DeviceGuard;

}  // namespace

const char* weighted_rmse_forward(const WeightedRmseArgs& a, int device, void* stream) {
  if (a.rows < 0 || a.length < 0) return "weighted_rmse: rows and length must be >= 0";
  if (a.length > 0x7fffffffLL) return "weighted_rmse: length too large";
  if (!a.loss) return "weighted_rmse: null loss pointer";
  if (a.rows > 0 && (!a.workspace || (a.length > 0 && (!a.pred || !a.target || !a.probed))))
    return "weighted_rmse: null data pointer";
  if (reinterpret_cast<std::uintptr_t>(a.workspace) % alignof(float2) != 0)
    return "weighted_rmse: the workspace must be 8-byte aligned";

  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess)
    return detail::named_error("weighted_rmse: cudaSetDevice", guard.status());
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  float2* part = reinterpret_cast<float2*>(a.workspace);

  if (a.rows > 0) {
    if (a.length == 0) {
      // No observation: no window has a probed one. Stage 2 must still see has = 0 partials.
      cudaError_t err = cudaMemsetAsync(part, 0, static_cast<size_t>(a.rows) * sizeof(float2), s);
      if (err != cudaSuccess) return detail::named_error("weighted_rmse: cudaMemsetAsync", err);
    } else {
      int sms = 0;
      cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
      if (err != cudaSuccess)
        return detail::named_error("weighted_rmse: cudaDeviceGetAttribute", err);
      const long long per_block = kStage1Threads / kWarp;
      const long long wanted = (a.rows + per_block - 1) / per_block;
      const int blocks = detail::capped_grid(wanted, 16, sms);
      const unsigned char* valid = a.valid ? a.valid : a.probed;
      if (a.pred_bf16)
        weighted_rmse_windows<true><<<blocks, kStage1Threads, 0, s>>>(
            a.pred, a.target, a.err, a.probed, valid, a.rows, a.length, part, a.dir);
      else
        weighted_rmse_windows<false><<<blocks, kStage1Threads, 0, s>>>(
            a.pred, a.target, a.err, a.probed, valid, a.rows, a.length, part, a.dir);
      if (const char* e = detail::launch_error("weighted_rmse_windows")) return e;
    }
  }
  weighted_rmse_reduce<<<1, kStage2Threads, 0, s>>>(part, a.rows, a.loss, a.scale);
  return detail::launch_error("weighted_rmse_reduce");
}

}  // namespace cuda
}  // namespace astromer_fast
