// Fused input embedding, CUDA device code: the kernel and its helpers (host launch code in
// input_embedding.cu, the contract in input_embedding.h). Kept apart from the host code so that
// python_tests/cuda_emulation/emu_cuda.h can compile this very file with g++ and run it on the CPU
// (python_tests/test_cuda_emulated.py); under ASTROMER_FAST_CUDA_EMULATION the CUDA headers are
// skipped and emu_cuda.h provides the CUDA names.
//
// The anonymous namespace is the one the kernel always had in input_embedding.cu: internal
// linkage and the same symbol names, so the generated code is unchanged by the move. The header is
// therefore meant for one translation unit at a time (input_embedding.cu or an emulation driver).
#pragma once

#include <cmath>

#ifndef ASTROMER_FAST_CUDA_EMULATION
#include <cuda_runtime.h>
#endif

// The dynamic shared buffer: `extern __shared__` on the GPU (the declaration nvcc always
// compiled); the emulation has no such storage class and hands out its per-block buffer instead
// (emu_cuda.h defines the macro).
#ifndef ASTROMER_FAST_DYNAMIC_SHARED
#define ASTROMER_FAST_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

namespace astromer_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// sin(x + quadrant_offset * pi/2): reduction to [-pi/4, pi/4] in double (t*omega reaches
// thousands of radians, far beyond what a float argument can resolve), then float minimax
// polynomials (Cephes sinf/cosf, ~1 ulp on that interval). Two float paths instead of a double
// sin keep consumer GPUs (1/64-rate FP64) fast, and the selects are branch-free so neighbouring
// sine and cosine channels never diverge within a warp.
__host__ __device__ __forceinline__ float sin_shifted(double x, int quadrant_offset) {
  constexpr double kTwoOverPi = 0.63661977236758134308;
  constexpr double kPio2Hi = 1.5707963267341256141662597656250;  // 33 bits: q*hi exact
  constexpr double kPio2Lo = 6.07710050650619224932e-11;
  const double q = rint(x * kTwoOverPi);
  const double r = fma(-q, kPio2Lo, fma(-q, kPio2Hi, x));
  const int quadrant = static_cast<int>(static_cast<long long>(q) & 3) + quadrant_offset;

  const float rf = static_cast<float>(r);
  const float z = rf * rf;
  const float s = fmaf(fmaf(fmaf(-1.9515295891e-4f, z, 8.3321608736e-3f), z, -1.6666654611e-1f) * z, rf, rf);
  const float c = fmaf(fmaf(fmaf(2.443315711809948e-5f, z, -1.388731625493765e-3f), z,
                            4.166664568298827e-2f) * z, z, fmaf(-0.5f, z, 1.0f));
  const float v = (quadrant & 1) ? c : s;
  return (quadrant & 2) ? -v : v;
}

// One thread per (even, odd) channel pair: a float2 store, and D even guarantees that a pair never
// straddles two rows. omega is built once per block in shared memory because a double pow per
// output would cost more than the rest of the kernel.
__global__ void __launch_bounds__(kThreads)
input_embedding_kernel(const float* __restrict__ t, const float* __restrict__ m,
                       const unsigned char* __restrict__ hidden, const float* __restrict__ w,
                       const float* __restrict__ b, const float* __restrict__ token,
                       double base, long long rows, int dim, float* __restrict__ out) {
  ASTROMER_FAST_DYNAMIC_SHARED(double, s_omega);
  for (int j = threadIdx.x; j < dim; j += blockDim.x)
    s_omega[j] = pow(base, -2.0 * static_cast<double>(j) / static_cast<double>(dim));
  __syncthreads();

  const bool use_token = token != nullptr && hidden != nullptr;
  const float tok = use_token ? __ldg(token) : 0.0f;
  const int half = dim / 2;
  const long long pairs = rows * half;
  float2* __restrict__ out2 = reinterpret_cast<float2*>(out);
  for (long long p = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs;
       p += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = p / half;
    const int j = 2 * static_cast<int>(p - r * half);
    const double tr = static_cast<double>(__ldg(t + r));
    const float mv = (use_token && __ldg(hidden + r)) ? tok : __ldg(m + r);
    float2 v;
    v.x = sin_shifted(tr * s_omega[j], 0) + fmaf(mv, __ldg(w + j), __ldg(b + j));
    v.y = sin_shifted(tr * s_omega[j + 1], 1) + fmaf(mv, __ldg(w + j + 1), __ldg(b + j + 1));
    out2[p] = v;
  }
}

}  // namespace
}  // namespace cuda
}  // namespace astromer_fast
