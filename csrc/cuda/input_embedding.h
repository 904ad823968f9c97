// Fused input embedding of Astromer (SPEC.md section 2), CUDA version. Same contract as
// cpu/input_embedding.h, with device pointers. This header deliberately includes no CUDA header
// so that the (host-compiled) bindings do not need the CUDA include path.
#pragma once

#include <cstdint>

namespace astromer_fast {
namespace cuda {

struct InputEmbeddingArgs {
  const float* t = nullptr;              // [rows], device
  const float* m = nullptr;              // [rows], device
  const std::uint8_t* hidden = nullptr;  // [rows], device, or null
  const float* w = nullptr;              // [dim], device
  const float* b = nullptr;              // [dim], device
  const float* token = nullptr;          // one value on the device, or null
  double base = 10000.0;
  std::int64_t rows = 0;
  std::int64_t dim = 0;                  // D, even
  float* out = nullptr;                  // [rows, dim], device, 8-byte aligned
};

// Enqueues the kernel on `stream` (a cudaStream_t; 0 = legacy default stream) on `device`.
// Returns nullptr on success, otherwise a static message (argument error or CUDA error string).
// Does not synchronise: asynchronous faults surface at the caller's next synchronisation.
const char* input_embedding_forward(const InputEmbeddingArgs& args, int device, void* stream);

// Versions for build_info(): compile-time CUDART_VERSION and what the process sees at run time
// (0 when unavailable, e.g. no driver installed).
int cuda_runtime_compiled_version();
int cuda_runtime_version();
int cuda_driver_version();
int cuda_device_count();  // 0 when there is no usable GPU

}  // namespace cuda
}  // namespace astromer_fast
