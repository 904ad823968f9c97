// Host launch code of the input embedding (kernel in input_embedding_kernels.cuh; contract in
// cuda/input_embedding.h) and the CUDA version queries of build_info().
//
// GPU runs are recorded in bench/RESULTS.md. On the CPU, python_tests/test_cuda_emulated.py runs it through the emulation of
// python_tests/cuda_emulation/emu_cuda.h (logic, tails and sin/cos accuracy; not the hardware).
#include "cuda/input_embedding.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/input_embedding_kernels.cuh"

namespace astromer_fast {
namespace cuda {
namespace {

using detail::DeviceGuard;

}  // namespace

const char* input_embedding_forward(const InputEmbeddingArgs& a, int device, void* stream) {
  if (a.rows < 0) return "input_embedding: rows must be >= 0";
  if (a.dim <= 0 || a.dim % 2 != 0) return "input_embedding: dim must be positive and even";
  if (a.dim > 6144) return "input_embedding: dim > 6144 does not fit the CUDA kernel's shared memory";
  if (!(a.base > 0.0)) return "input_embedding: base must be > 0";
  if (a.rows == 0) return nullptr;
  if (!a.t || !a.m || !a.w || !a.b || !a.out) return "input_embedding: null data pointer";
  if (reinterpret_cast<std::uintptr_t>(a.out) % alignof(float2) != 0)
    return "input_embedding: the output must be 8-byte aligned";

  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess)
    return detail::named_error("input_embedding: cudaSetDevice", guard.status());

  int sms = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return detail::named_error("input_embedding: cudaDeviceGetAttribute", err);
  // Enough resident blocks to fill every SM; the grid-stride loop covers the rest, which also
  // amortises each block's omega table.
  const long long pairs = a.rows * (a.dim / 2);
  const long long wanted = (pairs + kThreads - 1) / kThreads;
  const int blocks = detail::capped_grid(wanted, 8, sms);
  const size_t smem = static_cast<size_t>(a.dim) * sizeof(double);

  input_embedding_kernel<<<blocks, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(
      a.t, a.m, a.hidden, a.w, a.b, a.token, a.base, static_cast<long long>(a.rows),
      static_cast<int>(a.dim), a.out);
  return detail::launch_error("input_embedding_kernel");
}

int cuda_runtime_compiled_version() { return CUDART_VERSION; }

int cuda_runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int cuda_driver_version() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // "no driver" must not poison the next call's error check
    return 0;
  }
  return n;
}

}  // namespace cuda
}  // namespace astromer_fast
