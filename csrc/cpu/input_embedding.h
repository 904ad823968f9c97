// Fused input embedding of Astromer (SPEC.md section 2), CPU version.
//
//   out[r, j] = PE_j(t[r]) + m'[r] * w[j] + b[j]
//   PE_j(t)   = sin(t * omega_j) for even j, cos(t * omega_j) for odd j, omega_j = base^(-2j/D)
//   m'[r]     = *token if (token && hidden && hidden[r]) else m[r]
//
// Plain C++: no Python, no torch. All arrays are dense and row-major.
#pragma once

#include <cstdint>

namespace astromer_fast {
namespace cpu {

struct InputEmbeddingArgs {
  const float* t = nullptr;          // [rows]
  const float* m = nullptr;          // [rows]
  const std::uint8_t* hidden = nullptr;  // [rows] or null (torch.bool storage: 0 / 1)
  const float* w = nullptr;          // [dim]
  const float* b = nullptr;          // [dim]
  const float* token = nullptr;      // one value or null (Astromer 1: no MASK token)
  double base = 10000.0;
  std::int64_t rows = 0;
  std::int64_t dim = 0;              // D, even
  float* out = nullptr;              // [rows, dim]
  std::uint16_t* out_bf16 = nullptr;  // [rows, dim] bfloat16 (rounded to nearest even) instead of out
};

// Throws std::invalid_argument on bad arguments. num_threads <= 1 runs on the calling thread.
void input_embedding_forward(const InputEmbeddingArgs& args, int num_threads);

}  // namespace cpu
}  // namespace astromer_fast
