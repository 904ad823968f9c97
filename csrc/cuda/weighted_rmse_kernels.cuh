// Fused weighted masked RMSE, CUDA device code: the two kernels and their helpers (host launch
// code in weighted_rmse.cu, the contract in weighted_rmse.h). Kept apart from the host code so that
// python_tests/cuda_emulation/emu_cuda.h can compile this very file with g++ and run it on the CPU
// (python_tests/test_cuda_emulated.py); under ASTROMER_FAST_CUDA_EMULATION the CUDA headers are
// skipped and emu_cuda.h provides the CUDA names.
//
// The anonymous namespace is the one these kernels always had in weighted_rmse.cu: internal
// linkage and the same symbol names, so the generated code is unchanged by the move. The header is
// therefore meant for one translation unit at a time (weighted_rmse.cu or an emulation driver).
#pragma once

#include <cfloat>

#ifndef ASTROMER_FAST_CUDA_EMULATION
#include <cuda_runtime.h>
#endif

#include "cuda/shared_array.cuh"

namespace astromer_fast {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kStage1Threads = 256;  // 8 warps = 8 windows in flight per block
constexpr int kStage2Threads = 512;
constexpr unsigned kFull = 0xffffffffu;

template <bool kBf16>
__device__ __forceinline__ float load_pred(const void* p, long long i) {
  if constexpr (kBf16) {
    const unsigned short bits = __ldg(static_cast<const unsigned short*>(p) + i);
    return __uint_as_float(static_cast<unsigned>(bits) << 16);
  } else {
    return __ldg(static_cast<const float*>(p) + i);
  }
}

__device__ __forceinline__ float inv_err(const float* e, long long i) {
  // IEEE division (no fast-math): 1/e exactly as the float32 reference rounds it.
  return __fdiv_rn(1.0f, fmaxf(__ldg(e + i), 1e-8f));
}

// Stage 1: one warp per window (grid-stride over windows). Pass 1 finds lo/hi of 1/e over valid
// observations and the probed count; pass 2 (re-reading the window, which is in L1 by then)
// accumulates w p (y - yhat)^2 in float32 per lane, reduced by a fixed xor-shuffle tree.
template <bool kBf16>
__global__ void __launch_bounds__(kStage1Threads)
weighted_rmse_windows(const void* __restrict__ pred, const float* __restrict__ target,
                      const float* __restrict__ err, const unsigned char* __restrict__ probed,
                      const unsigned char* __restrict__ valid, long long rows, long long n,
                      float2* __restrict__ part, float* __restrict__ dir) {
  const int lane = threadIdx.x % kWarp;
  const long long warps_per_block = blockDim.x / kWarp;
  for (long long r = blockIdx.x * warps_per_block + threadIdx.x / kWarp; r < rows;
       r += static_cast<long long>(gridDim.x) * warps_per_block) {
    const long long off = r * n;
    float lo = FLT_MAX, hi = -FLT_MAX;
    int count = 0;
    for (long long l = lane; l < n; l += kWarp) {
      count += __ldg(probed + off + l) != 0;
      if (err != nullptr) {
        const float inv = inv_err(err, off + l);
        const bool ok = __ldg(valid + off + l) != 0;
        lo = fminf(lo, ok ? inv : FLT_MAX);
        hi = fmaxf(hi, ok ? inv : -FLT_MAX);
      }
    }
#pragma unroll
    for (int s = kWarp / 2; s > 0; s /= 2) {
      lo = fminf(lo, __shfl_xor_sync(kFull, lo, s));
      hi = fmaxf(hi, __shfl_xor_sync(kFull, hi, s));
      count += __shfl_xor_sync(kFull, count, s);
    }
    if (count == 0) {
      if (dir != nullptr)
        for (long long l = lane; l < n; l += kWarp) dir[off + l] = 0.0f;
      if (lane == 0) part[r] = make_float2(0.0f, 0.0f);
      continue;
    }
    const float span = hi - lo;  // -inf when no observation is valid: flat, all weights 0
    const bool flat = err == nullptr || span <= 0.0f;
    const float inv_count = __fdiv_rn(1.0f, static_cast<float>(count));
    float acc = 0.0f;
    for (long long l = lane; l < n; l += kWarp) {
      float w = static_cast<float>(__ldg(valid + off + l));
      if (!flat) w *= __fdiv_rn(inv_err(err, off + l) - lo, span) + 1e-3f;
      const float wp = w * static_cast<float>(__ldg(probed + off + l));
      const float d = load_pred<kBf16>(pred, off + l) - __ldg(target + off + l);
      acc = fmaf(wp * d, d, acc);
      if (dir != nullptr) dir[off + l] = wp * d * inv_count;
    }
#pragma unroll
    for (int s = kWarp / 2; s > 0; s /= 2) acc += __shfl_xor_sync(kFull, acc, s);
    if (lane == 0) part[r] = make_float2(__fdiv_rn(acc, static_cast<float>(count)), 1.0f);
  }
}

// Stage 2: one block. Thread i sums partials i, i + T, i + 2T, ... in double, then a shared-memory
// tree in a fixed order: the same bits every run, whatever the scheduling.
__global__ void __launch_bounds__(kStage2Threads)
weighted_rmse_reduce(const float2* __restrict__ part, long long rows, float* __restrict__ loss,
                     float* __restrict__ scale) {
  ASTROMER_FAST_SHARED_ARRAY(double, s_sum, kStage2Threads);
  ASTROMER_FAST_SHARED_ARRAY(long long, s_cnt, kStage2Threads);
  double sum = 0.0;
  long long cnt = 0;
  for (long long r = threadIdx.x; r < rows; r += blockDim.x) {
    const float2 p = part[r];
    if (p.y != 0.0f) {
      sum += static_cast<double>(p.x);
      ++cnt;
    }
  }
  s_sum[threadIdx.x] = sum;
  s_cnt[threadIdx.x] = cnt;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) {
      s_sum[threadIdx.x] += s_sum[threadIdx.x + s];
      s_cnt[threadIdx.x] += s_cnt[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const long long n_has = s_cnt[0];
    float l = 0.0f, sc = 0.0f;
    if (n_has > 0) {
      l = static_cast<float>(sqrt(s_sum[0] / static_cast<double>(n_has) + 1e-12));
      sc = static_cast<float>(1.0 / (static_cast<double>(l) * static_cast<double>(n_has)));
    }
    *loss = l;
    if (scale != nullptr) *scale = sc;
  }
}

}  // namespace
}  // namespace cuda
}  // namespace astromer_fast
