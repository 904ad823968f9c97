// Runs the input-embedding kernel of csrc/cuda/input_embedding_kernels.cuh on the CPU through
// emu_cuda.h, with the launch geometry of input_embedding.cu for a GPU with `sms`
// multiprocessors (a small `sms` makes the grid-stride loop take several turns). hidden is uint8
// or null, token one float or null. Built and loaded by python_tests/test_cuda_emulated.py
// (ctypes). Returns nullptr or an error message.
#include "emu_cuda.h"

#include <algorithm>

#include "cuda/input_embedding_kernels.cuh"

namespace k = astromer_fast::cuda;

extern "C" {

const char* embed_emu_forward(const float* t, const float* m, const std::uint8_t* hidden,
                              const float* w, const float* b, const float* token, double base,
                              long long rows, int dim, float* out, int sms) {
  if (rows == 0) return nullptr;
  const long long pairs = rows * (dim / 2);
  const long long wanted = (pairs + k::kThreads - 1) / k::kThreads;
  // detail::capped_grid(wanted, 8, sms) of common.cuh (which needs the CUDA runtime).
  const long long blocks = std::max(1LL, std::min(wanted, 8LL * std::max(sms, 1)));
  return emu::launch(static_cast<unsigned>(blocks), k::kThreads,
                     static_cast<std::size_t>(dim) * sizeof(double), k::input_embedding_kernel,
                     t, m, hidden, w, b, token, base, rows, dim, out);
}

}  // extern "C"
