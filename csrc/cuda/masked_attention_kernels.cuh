// Masked attention, scalar CUDA kernels: device code (kernels, helpers, constants). Host launch
// code in masked_attention.cu, the contract in masked_attention.h. Kept apart from the host code
// so that python_tests/cuda_emulation/emu_cuda.h can compile this very file with g++ and run it on
// the CPU (python_tests/test_cuda_emulated.py); under ASTROMER_FAST_CUDA_EMULATION the CUDA
// headers are skipped and emu_cuda.h provides the CUDA names.
//
// The anonymous namespace is the one these kernels always had in masked_attention.cu: internal
// linkage and the same symbol names, so the generated code is unchanged by the move. The header is
// therefore meant for one translation unit at a time (masked_attention.cu or an emulation driver).
//
// Layout: one CTA of 128 threads owns ROWS = 16 rows (queries for forward/dq, keys for dk/dv);
// the 8 consecutive lanes (r, sub) of a row split the work: in the score phase lane `sub` takes
// the tile columns sub, sub+8, ...; in the accumulation phase it owns the output channels
// sub, sub+8, ... (strided so that the 8 lanes hit 8 different shared-memory banks). The other
// operand streams through shared memory in tiles of TILE = 32 rows, converted to float32 on load;
// rows past L are zero and their probabilities exactly 0 (tail handling for any L >= 1).
// Scalar fp32 FMAs (no tensor cores yet): a clear first version.
#pragma once

#include <cmath>
#include <cstdint>

#ifndef ASTROMER_FAST_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#endif

#include "cuda/shared_array.cuh"

namespace astromer_fast {
namespace cuda {
namespace {

constexpr int kHD = 64;       // head dimension supported by these kernels
constexpr int kRows = 16;     // rows per CTA
constexpr int kSub = 8;       // lanes per row
constexpr int kThreads = kRows * kSub;
constexpr int kTile = 32;     // streamed tile
constexpr int kPerLane = kTile / kSub;  // tile columns per lane
constexpr int kDPerLane = kHD / kSub;   // output channels per lane
constexpr int kPad = kHD + 1;           // shared row stride (bank-conflict free)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Reductions over the 8 lanes of one row (lanes 8g .. 8g+7 of a warp).
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int o = 1; o < kSub; o <<= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = 1; o < kSub; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// True when every key of window b is hidden; all threads of the CTA must call it.
__device__ __forceinline__ bool all_keys_hidden(const std::uint8_t* __restrict__ kh, int L) {
  int visible = 0;
  for (int j = threadIdx.x; j < L; j += blockDim.x) visible |= (kh[j] == 0);
  return __syncthreads_or(visible) == 0;
}

// s' = mask terms applied to the scaled logit x, in float32 exactly as the reference adds them.
__device__ __forceinline__ float apply_mask(float x, int rule, bool q_hidden, bool k_hidden,
                                            bool all_hidden) {
  if (rule == 0) {
    if (k_hidden) {
      x = x + -1e9f;               // what the reference adds ...
      if (all_hidden) x = x + 1e9f;  // ... shifted back (exact) when the whole row is hidden
    }
    return x;
  }
  return x + ((q_hidden || k_hidden) ? 1.0f : 0.0f);
}

// Loads `rows` rows (row0 .. row0+rows-1 of a [L, kHD] matrix) into s[rows][kPad], zero past L.
template <class T>
__device__ __forceinline__ void load_rows(float* __restrict__ s, const T* __restrict__ g, int row0,
                                          int rows, int L) {
  for (int e = threadIdx.x; e < rows * kHD; e += blockDim.x) {
    const int r = e / kHD, d = e - r * kHD;
    const int gr = row0 + r;
    s[r * kPad + d] = gr < L ? to_f(g[static_cast<long long>(gr) * kHD + d]) : 0.0f;
  }
}

__device__ __forceinline__ float dot_rows(const float* __restrict__ a, const float* __restrict__ b) {
  float acc = 0.0f;
#pragma unroll 16
  for (int d = 0; d < kHD; ++d) acc = fmaf(a[d], b[d], acc);
  return acc;
}

template <class T>
__global__ void __launch_bounds__(kThreads)
attn_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                const std::uint8_t* __restrict__ key_hidden, int H, int L, int n_row_tiles,
                int rule, float scale, T* __restrict__ out, float* __restrict__ lse) {
  ASTROMER_FAST_SHARED_ARRAY(float, sQ, kRows * kPad);
  ASTROMER_FAST_SHARED_ARRAY(float, sK, kTile * kPad);
  ASTROMER_FAST_SHARED_ARRAY(float, sV, kTile * kPad);
  ASTROMER_FAST_SHARED_ARRAY(float, sP, kRows * (kTile + 1));
  ASTROMER_FAST_SHARED_ARRAY(unsigned char, sKH, kTile);

  const long long bh = blockIdx.x / n_row_tiles;
  const int row0 = static_cast<int>(blockIdx.x - bh * n_row_tiles) * kRows;
  const long long b = bh / H;
  const long long base = bh * L * kHD;
  const std::uint8_t* kh = key_hidden + b * L;
  const int r = threadIdx.x / kSub, sub = threadIdx.x % kSub;
  const int row = row0 + r;

  const bool all_hidden = all_keys_hidden(kh, L);
  load_rows(sQ, q + base, row0, kRows, L);
  const bool q_hidden = row < L && kh[row] != 0;

  float m = -INFINITY, l = 0.0f;
  float acc[kDPerLane];
#pragma unroll
  for (int c = 0; c < kDPerLane; ++c) acc[c] = 0.0f;

  for (int j0 = 0; j0 < L; j0 += kTile) {
    __syncthreads();  // the previous tile is no longer read (and sQ is loaded)
    load_rows(sK, k + base, j0, kTile, L);
    load_rows(sV, v + base, j0, kTile, L);
    for (int j = threadIdx.x; j < kTile; j += blockDim.x) sKH[j] = (j0 + j < L) ? kh[j0 + j] : 1;
    __syncthreads();

    float s[kPerLane];
    float tmax = -INFINITY;
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const int j = sub + kSub * t;
      float x = dot_rows(sQ + r * kPad, sK + j * kPad) * scale;
      x = (j0 + j < L) ? apply_mask(x, rule, q_hidden, sKH[j] != 0, all_hidden) : -INFINITY;
      s[t] = x;
      tmax = fmaxf(tmax, x);
    }
    // Column j0 < L is a real key, so the row maximum is finite from the first tile on.
    const float m_new = fmaxf(m, group_max(tmax));
    const float alpha = expf(m - m_new);  // 0 on the first tile (m = -inf)
    float psum = 0.0f;
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const float p = expf(s[t] - m_new);  // exactly 0 for columns past L
      sP[r * (kTile + 1) + sub + kSub * t] = p;
      psum += p;
    }
    l = l * alpha + group_sum(psum);
    m = m_new;
    __syncwarp();  // sP row r is written and read by the same 8 lanes of this warp
    const int nj = min(kTile, L - j0);
#pragma unroll
    for (int c = 0; c < kDPerLane; ++c) acc[c] *= alpha;
    for (int j = 0; j < nj; ++j) {
      const float p = sP[r * (kTile + 1) + j];
#pragma unroll
      for (int c = 0; c < kDPerLane; ++c) acc[c] = fmaf(p, sV[j * kPad + sub + kSub * c], acc[c]);
    }
    __syncwarp();  // reads of sP done before the next tile overwrites it
  }

  if (row < L) {
    const float inv = 1.0f / l;  // l >= 1: the maximum contributes exp(0)
    T* o = out + base + static_cast<long long>(row) * kHD;
#pragma unroll
    for (int c = 0; c < kDPerLane; ++c) o[sub + kSub * c] = from_f<T>(acc[c] * inv);
    if (sub == 0) lse[bh * L + row] = m + logf(l);
  }
}

// delta[i] = sum_d dout[i, d] * out[i, d], one warp per row.
template <class T>
__global__ void attn_delta_kernel(const T* __restrict__ out, const T* __restrict__ dout,
                                  long long rows, float* __restrict__ delta) {
  const long long warp = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= rows) return;  // whole warps leave together (rows are warp-uniform)
  const long long off = warp * kHD;
  float acc = 0.0f;
  for (int d = lane; d < kHD; d += 32) acc = fmaf(to_f(dout[off + d]), to_f(out[off + d]), acc);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) delta[warp] = acc;
}

// dq for 16 queries: loop over key tiles.
template <class T>
__global__ void __launch_bounds__(kThreads)
attn_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   const std::uint8_t* __restrict__ key_hidden, const T* __restrict__ dout,
                   const float* __restrict__ lse, const float* __restrict__ delta, int H, int L,
                   int n_row_tiles, int rule, float scale, T* __restrict__ dq) {
  ASTROMER_FAST_SHARED_ARRAY(float, sQ, kRows * kPad);
  ASTROMER_FAST_SHARED_ARRAY(float, sDO, kRows * kPad);
  ASTROMER_FAST_SHARED_ARRAY(float, sK, kTile * kPad);
  ASTROMER_FAST_SHARED_ARRAY(float, sV, kTile * kPad);
  ASTROMER_FAST_SHARED_ARRAY(float, sS, kRows * (kTile + 1));
  ASTROMER_FAST_SHARED_ARRAY(unsigned char, sKH, kTile);

  const long long bh = blockIdx.x / n_row_tiles;
  const int row0 = static_cast<int>(blockIdx.x - bh * n_row_tiles) * kRows;
  const long long b = bh / H;
  const long long base = bh * L * kHD;
  const std::uint8_t* kh = key_hidden + b * L;
  const int r = threadIdx.x / kSub, sub = threadIdx.x % kSub;
  const int row = row0 + r;

  const bool all_hidden = all_keys_hidden(kh, L);
  load_rows(sQ, q + base, row0, kRows, L);
  load_rows(sDO, dout + base, row0, kRows, L);
  const bool q_hidden = row < L && kh[row] != 0;
  const float lse_r = row < L ? lse[bh * L + row] : 0.0f;
  const float delta_r = row < L ? delta[bh * L + row] : 0.0f;

  float acc[kDPerLane];
#pragma unroll
  for (int c = 0; c < kDPerLane; ++c) acc[c] = 0.0f;

  for (int j0 = 0; j0 < L; j0 += kTile) {
    __syncthreads();
    load_rows(sK, k + base, j0, kTile, L);
    load_rows(sV, v + base, j0, kTile, L);
    for (int j = threadIdx.x; j < kTile; j += blockDim.x) sKH[j] = (j0 + j < L) ? kh[j0 + j] : 1;
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const int j = sub + kSub * t;
      float ds = 0.0f;
      if (row < L && j0 + j < L) {
        float x = dot_rows(sQ + r * kPad, sK + j * kPad) * scale;
        x = apply_mask(x, rule, q_hidden, sKH[j] != 0, all_hidden);
        const float p = expf(x - lse_r);
        const float dp = dot_rows(sDO + r * kPad, sV + j * kPad);
        ds = p * (dp - delta_r) * scale;
      }
      sS[r * (kTile + 1) + j] = ds;
    }
    __syncwarp();
    const int nj = min(kTile, L - j0);
    for (int j = 0; j < nj; ++j) {
      const float ds = sS[r * (kTile + 1) + j];
#pragma unroll
      for (int c = 0; c < kDPerLane; ++c) acc[c] = fmaf(ds, sK[j * kPad + sub + kSub * c], acc[c]);
    }
    __syncwarp();
  }
  if (row < L) {
    T* o = dq + base + static_cast<long long>(row) * kHD;
#pragma unroll
    for (int c = 0; c < kDPerLane; ++c) o[sub + kSub * c] = from_f<T>(acc[c]);
  }
}

// dk and dv for 16 keys: loop over query tiles.
template <class T>
__global__ void __launch_bounds__(kThreads)
attn_bwd_dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                     const std::uint8_t* __restrict__ key_hidden, const T* __restrict__ dout,
                     const float* __restrict__ lse, const float* __restrict__ delta, int H, int L,
                     int n_row_tiles, int rule, float scale, T* __restrict__ dk,
                     T* __restrict__ dv) {
  ASTROMER_FAST_SHARED_ARRAY(float, sK, kRows * kPad);
  ASTROMER_FAST_SHARED_ARRAY(float, sV, kRows * kPad);
  ASTROMER_FAST_SHARED_ARRAY(float, sQ, kTile * kPad);
  ASTROMER_FAST_SHARED_ARRAY(float, sDO, kTile * kPad);
  ASTROMER_FAST_SHARED_ARRAY(float, sP, kRows * (kTile + 1));
  ASTROMER_FAST_SHARED_ARRAY(float, sS, kRows * (kTile + 1));
  ASTROMER_FAST_SHARED_ARRAY(float, sLse, kTile);
  ASTROMER_FAST_SHARED_ARRAY(float, sDelta, kTile);
  ASTROMER_FAST_SHARED_ARRAY(unsigned char, sQH, kTile);

  const long long bh = blockIdx.x / n_row_tiles;
  const int row0 = static_cast<int>(blockIdx.x - bh * n_row_tiles) * kRows;  // keys
  const long long b = bh / H;
  const long long base = bh * L * kHD;
  const std::uint8_t* kh = key_hidden + b * L;
  const int r = threadIdx.x / kSub, sub = threadIdx.x % kSub;
  const int key = row0 + r;

  const bool all_hidden = all_keys_hidden(kh, L);
  load_rows(sK, k + base, row0, kRows, L);
  load_rows(sV, v + base, row0, kRows, L);
  const bool k_hidden = key < L && kh[key] != 0;

  float acc_k[kDPerLane], acc_v[kDPerLane];
#pragma unroll
  for (int c = 0; c < kDPerLane; ++c) acc_k[c] = acc_v[c] = 0.0f;

  for (int i0 = 0; i0 < L; i0 += kTile) {
    __syncthreads();
    load_rows(sQ, q + base, i0, kTile, L);
    load_rows(sDO, dout + base, i0, kTile, L);
    for (int i = threadIdx.x; i < kTile; i += blockDim.x) {
      const bool in = i0 + i < L;
      sLse[i] = in ? lse[bh * L + i0 + i] : 0.0f;
      sDelta[i] = in ? delta[bh * L + i0 + i] : 0.0f;
      sQH[i] = in ? kh[i0 + i] : 0;
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const int i = sub + kSub * t;
      float p = 0.0f, ds = 0.0f;
      if (key < L && i0 + i < L) {
        float x = dot_rows(sQ + i * kPad, sK + r * kPad) * scale;
        x = apply_mask(x, rule, sQH[i] != 0, k_hidden, all_hidden);
        p = expf(x - sLse[i]);
        const float dp = dot_rows(sDO + i * kPad, sV + r * kPad);
        ds = p * (dp - sDelta[i]) * scale;
      }
      sP[r * (kTile + 1) + i] = p;
      sS[r * (kTile + 1) + i] = ds;
    }
    __syncwarp();
    const int ni = min(kTile, L - i0);
    for (int i = 0; i < ni; ++i) {
      const float p = sP[r * (kTile + 1) + i];
      const float ds = sS[r * (kTile + 1) + i];
#pragma unroll
      for (int c = 0; c < kDPerLane; ++c) {
        acc_v[c] = fmaf(p, sDO[i * kPad + sub + kSub * c], acc_v[c]);
        acc_k[c] = fmaf(ds, sQ[i * kPad + sub + kSub * c], acc_k[c]);
      }
    }
    __syncwarp();
  }
  if (key < L) {
    const long long off = base + static_cast<long long>(key) * kHD;
#pragma unroll
    for (int c = 0; c < kDPerLane; ++c) {
      dk[off + sub + kSub * c] = from_f<T>(acc_k[c]);
      dv[off + sub + kSub * c] = from_f<T>(acc_v[c]);
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace astromer_fast
