#include "cuda/input_embedding.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "cuda/common.cuh"

namespace astromer_fast {
namespace cuda {
namespace {

using detail::DeviceGuard;

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
  extern __shared__ double s_omega[];
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
