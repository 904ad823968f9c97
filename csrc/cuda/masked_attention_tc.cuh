// Masked attention (SPEC.md section 3) on tensor cores: bf16 q/k/v/out/dout/dq/dk/dv, float32
// accumulation, head_dim 64, 1 <= L <= 256. Device code only (kernels and their helpers) plus the
// shared-memory layouts and launch geometry that host code (masked_attention_tc.cu, and the CPU
// emulation in python_tests/cuda_emulation) computes from the same functions.
//
// NOT YET RUN ON A GPU: written on a machine without one. Its indexing, masking, tails,
// synchronisation and numerics are tested on the CPU by compiling this very file with g++ against
// python_tests/cuda_emulation/emu_cuda.h (which defines ASTROMER_FAST_CUDA_EMULATION and replaces
// the CUDA headers); speed and real-hardware behaviour are unverified.
//
// Rules that make the emulation meaningful: WMMA fragments are used as opaque tiles (load, mma,
// store, fill); nothing depends on which lane holds which element. Everything row-dependent
// (mask, softmax, lse, 1/rowsum, delta) goes through shared memory and plain threads. The
// emulation gives every lane the whole tile and lets only lane 0 store it, so a missing
// __syncwarp between a store_matrix_sync and the reads of other lanes gives wrong results there.
//
// Design (L <= 256: one (b, h)'s K and V, or Q and dO, fit in shared memory, 36 KB each at most):
//  * forward, one CTA per (b*h, split), 4 warps; a warp owns 16 query rows at a time: S = Q K^T
//    for the whole row block (16 x Lpad fp32 in shared memory), exact softmax by the warp's lanes
//    (32 lanes per row, max and sum by shuffles), lse, P as bf16 in place over S, O = P V, 1/l,
//    bf16 out. No online softmax is needed since the whole row is there.
//  * backward, three launches: delta = rowsum(dO * O); dq (a warp per 16 queries, K and V in
//    shared memory) and dk/dv (a warp per 16 keys, Q and dO in shared memory). Both walk the other
//    side in 16-wide chunks: S and dP chunks by WMMA, P = exp(s' - lse) and dS = P (dP - delta)
//    scale by the lanes (bf16 into a 16 x 16 tile), then dQ += dS K, or dV += P^T dO and
//    dK += dS^T Q, accumulated in fragments. Deterministic: every output element has one writer,
//    no atomics.
//  * shared rows are padded to 72 bf16 (144 bytes): the 8 rows an ldmatrix phase reads fall in 8
//    different 16-byte bank groups. Global loads and stores are 16 bytes per thread, 8 threads per
//    128-byte row. WMMA needs 32-byte aligned tile pointers and ldm a multiple of 16 bytes
//    (CUDA C++ Programming Guide, "Warp Matrix Functions"); every layout below keeps both.
#pragma once

#include <cstdint>

#ifndef ASTROMER_FAST_CUDA_EMULATION
#include <cuda_bf16.h>
#include <mma.h>
#endif

// Bodies exist for sm_80+ (bf16 WMMA) and in the CPU emulation; elsewhere (the host pass, sm_75)
// the kernels are empty and the host never launches them (compute capability check).
#if defined(ASTROMER_FAST_CUDA_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define ASTROMER_FAST_TC_BODY 1
#else
#define ASTROMER_FAST_TC_BODY 0
#endif

namespace astromer_fast {
namespace cuda {
namespace tc {

constexpr int kHD = 64;        // head dimension
constexpr int kMaxL = 256;     // K/V (or Q/dO) of one (b, h) must fit in shared memory
constexpr int kLd = kHD + 8;   // bf16 row stride of staged [rows][64] matrices (144 bytes)
constexpr int kChunkLd = 20;   // fp32 row stride of the 16 x 16 score chunks (80 bytes)
constexpr int kTileLd = 24;    // bf16 row stride of the 16 x 16 P / dS chunks (48 bytes)
constexpr int kOutLd = kHD + 4;  // fp32 row stride when a 16 x 64 result goes through smem
constexpr int kFwdWarps = 4;
constexpr int kBwdWarps = 8;

struct Params {
  const __nv_bfloat16* q;
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  const std::uint8_t* key_hidden;  // [B, L]
  const __nv_bfloat16* out;        // backward input (forward: written through out_w)
  __nv_bfloat16* out_w;
  float* lse;                      // forward output
  const float* lse_in;             // backward input
  const __nv_bfloat16* dout;
  float* delta;                    // written by the delta kernel, read by the other two
  __nv_bfloat16* dq;
  __nv_bfloat16* dk;
  __nv_bfloat16* dv;
  long long rows;  // B * H * L (delta kernel)
  int heads, length, nsplit, rule;
  float scale;
};

__host__ __device__ inline int round_up(int x, int m) { return (x + m - 1) / m * m; }
__host__ __device__ inline int padded_length(int L) { return round_up(L, 16); }

// Forward: [sK | sV : Lpad x kLd bf16] [per warp: 16 x ldS fp32 (Q staging, S, P, O)]
//          [per warp: 16 floats 1/l] [key flags: Lpad bytes]
struct FwdLayout {
  int lpad, lds;
  unsigned k, v, warp0, warp_bytes, inv_l, kh, bytes;
};
__host__ __device__ inline FwdLayout fwd_layout(int L) {
  FwdLayout s;
  s.lpad = padded_length(L);
  // A multiple of 4 floats (fp32 WMMA ldm), and as bf16 (P in place) 2*lds, a multiple of 8;
  // 4*lds bytes is an odd multiple of 16, so P's ldmatrix rows hit distinct bank groups.
  // At least kOutLd wide so that O (16 x 64 fp32) fits too.
  s.lds = (s.lpad > kHD ? s.lpad : kHD) + 4;
  const unsigned mat = static_cast<unsigned>(s.lpad) * kLd * 2u;
  s.k = 0;
  s.v = mat;
  s.warp0 = 2 * mat;
  s.warp_bytes = 16u * static_cast<unsigned>(s.lds) * 4u;
  s.inv_l = s.warp0 + kFwdWarps * s.warp_bytes;
  s.kh = s.inv_l + kFwdWarps * 16u * 4u;
  s.bytes = s.kh + static_cast<unsigned>(round_up(s.lpad, 16));
  return s;
}

// Backward per-warp scratch: staging of the warp's two 16 x 64 bf16 row blocks (4608 bytes),
// later two 16 x 16 fp32 chunks + two 16 x 16 bf16 tiles (4096), finally one 16 x 64 fp32 result
// (4352), plus per-row lse / delta (dq kernel).
constexpr unsigned kBwdWarpBytes = 2u * 16u * kLd * 2u;
constexpr unsigned kChunkBytes = 16u * kChunkLd * 4u;
constexpr unsigned kTileBytes = 16u * kTileLd * 2u;
static_assert(2 * kChunkBytes + 2 * kTileBytes <= kBwdWarpBytes, "backward warp scratch");
static_assert(16u * kOutLd * 4u <= kBwdWarpBytes, "backward warp scratch (result)");

// dq: [sK | sV] [warps x kBwdWarpBytes] [warps x 16 lse][warps x 16 delta] [key flags]
// dk/dv: [sQ | sdO] [warps x kBwdWarpBytes] [Lpad lse][Lpad delta] [key flags]
struct BwdLayout {
  int lpad;
  unsigned a, b, warp0, lse, delta, kh, bytes;
};
__host__ __device__ inline BwdLayout bwd_layout(int L, bool dkdv) {
  BwdLayout s;
  s.lpad = padded_length(L);
  const unsigned mat = static_cast<unsigned>(s.lpad) * kLd * 2u;
  const unsigned stats = dkdv ? static_cast<unsigned>(s.lpad) * 4u : kBwdWarps * 16u * 4u;
  s.a = 0;
  s.b = mat;
  s.warp0 = 2 * mat;
  s.lse = s.warp0 + kBwdWarps * kBwdWarpBytes;
  s.delta = s.lse + stats;
  s.kh = s.delta + stats;
  s.bytes = s.kh + static_cast<unsigned>(round_up(s.lpad, 16));
  return s;
}

// CTAs per (b, h): enough CTAs in all to fill `target_ctas` (a few waves of the GPU) when B*H
// is small, never more than there are warp tiles to hand out.
inline int choose_nsplit(long long bh, int L, int warps, long long target_ctas) {
  const int tiles = padded_length(L) / 16;
  const int max_split = (tiles + warps - 1) / warps;
  long long want = bh > 0 ? (target_ctas + bh - 1) / bh : 1;
  if (want < 1) want = 1;
  return static_cast<int>(want < max_split ? want : max_split);
}

#if ASTROMER_FAST_TC_BODY

namespace wmma = nvcuda::wmma;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

__device__ __forceinline__ unsigned char* dynamic_smem() {
#ifdef ASTROMER_FAST_CUDA_EMULATION
  return emu::dynamic_smem();
#else
  extern __shared__ __align__(128) unsigned char tc_smem[];
  return tc_smem;
#endif
}

// Fragment loads from shared memory. nvcc 13 emits bf16 wmma.load in the generic state space
// whatever the pointer (checked in the PTX), which ptxas turns into 32-bit generic loads (LD.E);
// naming .shared gives one ldmatrix (LDSM.16.M88.4) per fragment (checked in the sm_90 SASS).
// Same instruction and register order as mma.hpp's load_matrix_sync (the fragment as 4 ints),
// only the state space differs. -DASTROMER_FAST_TC_GENERIC_LOADS restores the plain API (to rule
// this wrapper out on a GPU); the CPU emulation always uses it.
#if defined(ASTROMER_FAST_CUDA_EMULATION) || defined(ASTROMER_FAST_TC_GENERIC_LOADS)
template <class Frag>
__device__ __forceinline__ void load_tile(Frag& f, const __nv_bfloat16* p, unsigned ldm) {
  wmma::load_matrix_sync(f, p, ldm);
}
#else
#define ASTROMER_FAST_TC_LOAD(FRAG, PTX)                                                       \
  __device__ __forceinline__ void load_tile(FRAG& f, const __nv_bfloat16* p, unsigned ldm) {  \
    int* r = reinterpret_cast<int*>(&f);                                                       \
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));                 \
    asm volatile(PTX " {%0, %1, %2, %3}, [%4], %5;"                                            \
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                              \
                 : "r"(addr), "r"(ldm)                                                         \
                 : "memory");                                                                  \
  }
ASTROMER_FAST_TC_LOAD(FragA, "wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16")
ASTROMER_FAST_TC_LOAD(FragBRow, "wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16")
ASTROMER_FAST_TC_LOAD(FragBCol, "wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16")
#undef ASTROMER_FAST_TC_LOAD
#endif

// The mask terms of the scaled logit, in float32 exactly as the reference adds them (same as
// apply_mask in masked_attention.cu).
__device__ __forceinline__ float mask_logit(float x, int rule, bool q_hidden, bool k_hidden,
                                            bool all_hidden) {
  if (rule == 0) {
    if (k_hidden) {
      x = x + -1e9f;
      if (all_hidden) x = x + 1e9f;  // exact; keeps lse small enough to recompute P from it
    }
    return x;
  }
  return x + ((q_hidden || k_hidden) ? 1.0f : 0.0f);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float bf16_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
  return static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

// Copies rows [row0, row0 + rows) of a [L, 64] bf16 matrix into dst[rows][kLd], zero past L:
// 16 bytes per thread, 8 threads per 128-byte row (coalesced), `nthreads` threads from `tid`.
__device__ __forceinline__ void stage_rows(__nv_bfloat16* __restrict__ dst,
                                           const __nv_bfloat16* __restrict__ src, int row0,
                                           int rows, int L, int tid, int nthreads) {
  for (int e = tid; e < rows * 8; e += nthreads) {
    const int r = e >> 3, c = e & 7;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (row0 + r < L)
      val = *reinterpret_cast<const uint4*>(src + static_cast<long long>(row0 + r) * kHD + c * 8);
    *reinterpret_cast<uint4*>(dst + r * kLd + c * 8) = val;
  }
}

// Writes rows [row0, row0 + 16) (those < L) of a 16 x 64 fp32 smem block (row stride ld), times
// row_scale[r] when given, as bf16 into dst [L, 64]; one warp.
__device__ __forceinline__ void write_rows(__nv_bfloat16* __restrict__ dst,
                                           const float* __restrict__ src, int ld,
                                           const float* __restrict__ row_scale, int row0, int L,
                                           int lane) {
#pragma unroll
  for (int it = 0; it < 4; ++it) {
    const int e = lane + 32 * it;
    const int r = e >> 3, c = e & 7;
    if (row0 + r < L) {
      const float* s = src + r * ld + c * 8;
      const float f = row_scale ? row_scale[r] : 1.0f;
      uint4 w;
      w.x = pack_bf16x2(s[0] * f, s[1] * f);
      w.y = pack_bf16x2(s[2] * f, s[3] * f);
      w.z = pack_bf16x2(s[4] * f, s[5] * f);
      w.w = pack_bf16x2(s[6] * f, s[7] * f);
      *reinterpret_cast<uint4*>(dst + static_cast<long long>(row0 + r) * kHD + c * 8) = w;
    }
  }
}

// Stages the (b, h) key flags and returns whether every key of the window is hidden.
// All threads of the CTA call it.
__device__ __forceinline__ bool stage_key_flags(unsigned char* __restrict__ skh,
                                                const std::uint8_t* __restrict__ kh, int L,
                                                int lpad) {
  int visible = 0;
  for (int j = threadIdx.x; j < lpad; j += blockDim.x) {
    const unsigned char h = j < L ? (kh[j] != 0) : 1;
    skh[j] = h;
    visible |= (j < L && h == 0);
  }
  return __syncthreads_or(visible) == 0;  // also orders the smem writes above for every thread
}

// Stores S tiles nt .. nt + N - 1 (16 x 16 each, Q K^T unscaled) into s (fp32, row stride lds).
template <int N>
__device__ __forceinline__ void score_tiles(float* __restrict__ s, int lds,
                                            const __nv_bfloat16* __restrict__ sK, int nt,
                                            const FragA (&qa)[kHD / 16]) {
  FragC acc[N];
#pragma unroll
  for (int t = 0; t < N; ++t) wmma::fill_fragment(acc[t], 0.0f);
#pragma unroll
  for (int kk = 0; kk < kHD / 16; ++kk) {
#pragma unroll
    for (int t = 0; t < N; ++t) {
      FragBCol kb;  // element (d, j) = K[j][d]
      load_tile(kb, sK + (nt + t) * 16 * kLd + kk * 16, kLd);
      wmma::mma_sync(acc[t], qa[kk], kb, acc[t]);
    }
  }
#pragma unroll
  for (int t = 0; t < N; ++t)
    wmma::store_matrix_sync(s + (nt + t) * 16, acc[t], lds, wmma::mem_row_major);
}

// Writes a warp's 16 x 64 fp32 accumulator (times row_scale[r] when given) as bf16 rows
// [row0, row0 + 16) of dst, through the warp's smem block `res` (row stride ld): fragments cannot
// be addressed by row. The first __syncwarp lets every lane finish reading what `res` overlaps,
// the last lets the caller reuse `res`.
__device__ __forceinline__ void write_acc(__nv_bfloat16* __restrict__ dst, float* __restrict__ res,
                                          int ld, const FragC (&acc)[kHD / 16],
                                          const float* __restrict__ row_scale, int row0, int L,
                                          int lane) {
  __syncwarp();
#pragma unroll
  for (int n = 0; n < kHD / 16; ++n)
    wmma::store_matrix_sync(res + n * 16, acc[n], ld, wmma::mem_row_major);
  __syncwarp();
  write_rows(dst, res, ld, row_scale, row0, L, lane);
  __syncwarp();
}

// The two 16 x 16 chunks a backward step needs, into chS and chP (fp32, row stride kChunkLd):
// xa . X[tile]^T and ya . Y[tile]^T, X and Y staged [Lpad][kLd]. dq: (Q K^T, dO V^T);
// dk/dv: (K Q^T, V dO^T), i.e. S^T and dP^T.
__device__ __forceinline__ void chunk_pair(float* __restrict__ chS, float* __restrict__ chP,
                                           const FragA (&xa)[kHD / 16],
                                           const FragA (&ya)[kHD / 16],
                                           const __nv_bfloat16* __restrict__ sX,
                                           const __nv_bfloat16* __restrict__ sY, int tile) {
  FragC sacc, pacc;
  wmma::fill_fragment(sacc, 0.0f);
  wmma::fill_fragment(pacc, 0.0f);
#pragma unroll
  for (int kk = 0; kk < kHD / 16; ++kk) {
    FragBCol b;  // element (d, j) = X[j][d], then Y[j][d]
    load_tile(b, sX + tile * 16 * kLd + kk * 16, kLd);
    wmma::mma_sync(sacc, xa[kk], b, sacc);
    load_tile(b, sY + tile * 16 * kLd + kk * 16, kLd);
    wmma::mma_sync(pacc, ya[kk], b, pacc);
  }
  wmma::store_matrix_sync(chS, sacc, kChunkLd, wmma::mem_row_major);
  wmma::store_matrix_sync(chP, pacc, kChunkLd, wmma::mem_row_major);
}

#endif  // ASTROMER_FAST_TC_BODY

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kFwdWarps * 32, 2) attn_tc_fwd_kernel(const Params p) {
#if ASTROMER_FAST_TC_BODY
  const int L = p.length;
  const FwdLayout lay = fwd_layout(L);
  const int lpad = lay.lpad, lds = lay.lds, ntiles = lpad / 16;
  unsigned char* smem = dynamic_smem();
  __nv_bfloat16* sK = reinterpret_cast<__nv_bfloat16*>(smem + lay.k);
  __nv_bfloat16* sV = reinterpret_cast<__nv_bfloat16*>(smem + lay.v);
  unsigned char* sKH = smem + lay.kh;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* buf = reinterpret_cast<float*>(smem + lay.warp0 + warp * lay.warp_bytes);
  __nv_bfloat16* bufh = reinterpret_cast<__nv_bfloat16*>(buf);  // same bytes, as bf16
  float* inv_l = reinterpret_cast<float*>(smem + lay.inv_l) + warp * 16;

  const long long bh = blockIdx.x / p.nsplit;
  const int split = static_cast<int>(blockIdx.x - bh * p.nsplit);
  const long long base = bh * L * kHD;
  const std::uint8_t* kh = p.key_hidden + (bh / p.heads) * L;

  stage_rows(sK, p.k + base, 0, lpad, L, threadIdx.x, blockDim.x);
  stage_rows(sV, p.v + base, 0, lpad, L, threadIdx.x, blockDim.x);
  const bool all_hidden = stage_key_flags(sKH, kh, L, lpad);  // includes __syncthreads

  for (int t = split * kFwdWarps + warp; t < ntiles; t += p.nsplit * kFwdWarps) {
    const int row0 = t * 16;
    // Q rows -> fragments (staged as bf16 [16][kLd] at the start of buf).
    stage_rows(bufh, p.q + base, row0, 16, L, lane, 32);
    __syncwarp();
    FragA qa[kHD / 16];
#pragma unroll
    for (int kk = 0; kk < kHD / 16; ++kk) load_tile(qa[kk], bufh + kk * 16, kLd);
    __syncwarp();  // S overwrites the staged rows

    // S = Q K^T, 16 x lpad fp32 (unscaled dot products), two key tiles per pass: two
    // independent MMA chains, since one chain of 4 dependent MMAs per warp leaves the tensor
    // cores waiting with only ~2 warps per SM sub-partition.
    int nt = 0;
    for (; nt + 1 < ntiles; nt += 2) score_tiles<2>(buf, lds, sK, nt, qa);
    if (nt < ntiles) score_tiles<1>(buf, lds, sK, nt, qa);
    __syncwarp();

    // Row softmax, one row at a time by all 32 lanes (column lane + 32c: conflict-free).
    for (int r = 0; r < 16; ++r) {
      const int row = row0 + r;
      const bool q_hidden = row < L && sKH[row] != 0;
      float x[kMaxL / 32];
      float m = -INFINITY;
#pragma unroll
      for (int c = 0; c < kMaxL / 32; ++c) {
        const int j = lane + 32 * c;
        float s = -INFINITY;  // padding keys: probability exactly 0
        if (j < L) s = mask_logit(buf[r * lds + j] * p.scale, p.rule, q_hidden, sKH[j] != 0,
                                  all_hidden);
        x[c] = s;
        m = fmaxf(m, s);
      }
      m = warp_max(m);  // finite: key 0 < L is a real key
      float sum = 0.0f;
#pragma unroll
      for (int c = 0; c < kMaxL / 32; ++c) {
        x[c] = expf(x[c] - m);
        sum += x[c];
      }
      sum = warp_sum(sum);  // >= 1 (the maximum contributes exp(0))
      __syncwarp();  // every lane has read row r of S before P overwrites its first half
#pragma unroll
      for (int c = 0; c < kMaxL / 32; ++c) {
        const int j = lane + 32 * c;
        if (j < lpad) bufh[r * 2 * lds + j] = __float2bfloat16_rn(x[c]);
      }
      if (lane == 0) {
        inv_l[r] = 1.0f / sum;
        if (row < L) p.lse[bh * L + row] = m + logf(sum);
      }
    }
    __syncwarp();

    // O = P V (P unnormalised, rows past L and keys past L are zero).
    FragC oacc[kHD / 16];
#pragma unroll
    for (int n = 0; n < kHD / 16; ++n) wmma::fill_fragment(oacc[n], 0.0f);
    for (int kt = 0; kt < ntiles; ++kt) {
      FragA pa;
      load_tile(pa, bufh + kt * 16, 2 * lds);
#pragma unroll
      for (int n = 0; n < kHD / 16; ++n) {
        FragBRow vb;  // element (j, d) = V[j][d]
        load_tile(vb, sV + kt * 16 * kLd + n * 16, kLd);
        wmma::mma_sync(oacc[n], pa, vb, oacc[n]);
      }
    }
    // (every lane has read P before O overwrites it; buf is free for the next tile's Q after)
    write_acc(p.out_w + base, buf, lds, oacc, inv_l, row0, L, lane);
  }
#endif
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
// delta[i] = sum_d dO[i, d] O[i, d] (bf16 values, fp32 products and sums); 8 lanes per row.
__global__ void __launch_bounds__(256) attn_tc_delta_kernel(const Params p) {
#if ASTROMER_FAST_TC_BODY
  const long long row = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) >> 3;
  const int c = threadIdx.x & 7;
  float acc = 0.0f;
  if (row < p.rows) {
    const uint4 o = *reinterpret_cast<const uint4*>(p.out + row * kHD + c * 8);
    const uint4 d = *reinterpret_cast<const uint4*>(p.dout + row * kHD + c * 8);
    acc = fmaf(bf16_lo(d.x), bf16_lo(o.x), acc);
    acc = fmaf(bf16_hi(d.x), bf16_hi(o.x), acc);
    acc = fmaf(bf16_lo(d.y), bf16_lo(o.y), acc);
    acc = fmaf(bf16_hi(d.y), bf16_hi(o.y), acc);
    acc = fmaf(bf16_lo(d.z), bf16_lo(o.z), acc);
    acc = fmaf(bf16_hi(d.z), bf16_hi(o.z), acc);
    acc = fmaf(bf16_lo(d.w), bf16_lo(o.w), acc);
    acc = fmaf(bf16_hi(d.w), bf16_hi(o.w), acc);
  }
  // Every lane takes part in the shuffles (rows are uniform over the 8 lanes of a group).
  acc += __shfl_xor_sync(0xffffffffu, acc, 4);
  acc += __shfl_xor_sync(0xffffffffu, acc, 2);
  acc += __shfl_xor_sync(0xffffffffu, acc, 1);
  if (row < p.rows && c == 0) p.delta[row] = acc;
#endif
}

// dq for 16 queries per warp; K, V of the (b, h) in shared memory.
__global__ void __launch_bounds__(kBwdWarps * 32, 2) attn_tc_dq_kernel(const Params p) {
#if ASTROMER_FAST_TC_BODY
  const int L = p.length;
  const BwdLayout lay = bwd_layout(L, false);
  const int lpad = lay.lpad, ntiles = lpad / 16;
  unsigned char* smem = dynamic_smem();
  __nv_bfloat16* sK = reinterpret_cast<__nv_bfloat16*>(smem + lay.a);
  __nv_bfloat16* sV = reinterpret_cast<__nv_bfloat16*>(smem + lay.b);
  unsigned char* sKH = smem + lay.kh;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned char* wbuf = smem + lay.warp0 + warp * kBwdWarpBytes;
  __nv_bfloat16* stQ = reinterpret_cast<__nv_bfloat16*>(wbuf);
  __nv_bfloat16* stDO = stQ + 16 * kLd;
  float* chS = reinterpret_cast<float*>(wbuf);
  float* chP = reinterpret_cast<float*>(wbuf + kChunkBytes);
  __nv_bfloat16* tDS = reinterpret_cast<__nv_bfloat16*>(wbuf + 2 * kChunkBytes);
  float* res = reinterpret_cast<float*>(wbuf);
  float* wLse = reinterpret_cast<float*>(smem + lay.lse) + warp * 16;
  float* wDelta = reinterpret_cast<float*>(smem + lay.delta) + warp * 16;

  const long long bh = blockIdx.x / p.nsplit;
  const int split = static_cast<int>(blockIdx.x - bh * p.nsplit);
  const long long base = bh * L * kHD;
  const std::uint8_t* kh = p.key_hidden + (bh / p.heads) * L;

  stage_rows(sK, p.k + base, 0, lpad, L, threadIdx.x, blockDim.x);
  stage_rows(sV, p.v + base, 0, lpad, L, threadIdx.x, blockDim.x);
  const bool all_hidden = stage_key_flags(sKH, kh, L, lpad);

  // This lane's element of each 16 x 16 chunk: row r, columns c0 .. c0 + 7.
  const int r = lane >> 1, c0 = (lane & 1) * 8;

  for (int t = split * kBwdWarps + warp; t < ntiles; t += p.nsplit * kBwdWarps) {
    const int row0 = t * 16;
    stage_rows(stQ, p.q + base, row0, 16, L, lane, 32);
    stage_rows(stDO, p.dout + base, row0, 16, L, lane, 32);
    if (lane < 16) {
      const bool in = row0 + lane < L;
      wLse[lane] = in ? p.lse_in[bh * L + row0 + lane] : 0.0f;
      wDelta[lane] = in ? p.delta[bh * L + row0 + lane] : 0.0f;
    }
    __syncwarp();
    FragA qa[kHD / 16], da[kHD / 16];
#pragma unroll
    for (int kk = 0; kk < kHD / 16; ++kk) {
      load_tile(qa[kk], stQ + kk * 16, kLd);
      load_tile(da[kk], stDO + kk * 16, kLd);
    }
    const int row = row0 + r;
    const bool row_in = row < L;
    const bool q_hidden = row_in && sKH[row] != 0;
    const float lse_r = wLse[r], delta_r = wDelta[r];
    __syncwarp();  // the chunks below overwrite the staged rows

    FragC dqacc[kHD / 16];
#pragma unroll
    for (int n = 0; n < kHD / 16; ++n) wmma::fill_fragment(dqacc[n], 0.0f);
    for (int kt = 0; kt < ntiles; ++kt) {
      chunk_pair(chS, chP, qa, da, sK, sV, kt);  // S = Q K^T, dP = dO V^T
      __syncwarp();
#pragma unroll
      for (int c = c0; c < c0 + 8; ++c) {
        const int j = kt * 16 + c;
        float ds = 0.0f;
        if (row_in && j < L) {
          const float x = mask_logit(chS[r * kChunkLd + c] * p.scale, p.rule, q_hidden,
                                     sKH[j] != 0, all_hidden);
          const float pr = expf(x - lse_r);
          ds = pr * (chP[r * kChunkLd + c] - delta_r) * p.scale;
        }
        tDS[r * kTileLd + c] = __float2bfloat16_rn(ds);
      }
      __syncwarp();
      FragA dsa;
      load_tile(dsa, tDS, kTileLd);
#pragma unroll
      for (int n = 0; n < kHD / 16; ++n) {
        FragBRow kb;  // (j, d) = K[j][d]
        load_tile(kb, sK + kt * 16 * kLd + n * 16, kLd);
        wmma::mma_sync(dqacc[n], dsa, kb, dqacc[n]);
      }
      // The next chunk's stores come after every lane passed the __syncwarp above, i.e. after
      // its reads of chS/chP; its tDS writes come after the next __syncwarp, i.e. after every
      // lane's load of tDS here.
    }
    write_acc(p.dq + base, res, kOutLd, dqacc, nullptr, row0, L, lane);
  }
#endif
}

// dk and dv for 16 keys per warp; Q, dO, lse, delta of the (b, h) in shared memory.
__global__ void __launch_bounds__(kBwdWarps * 32, 2) attn_tc_dkdv_kernel(const Params p) {
#if ASTROMER_FAST_TC_BODY
  const int L = p.length;
  const BwdLayout lay = bwd_layout(L, true);
  const int lpad = lay.lpad, ntiles = lpad / 16;
  unsigned char* smem = dynamic_smem();
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem + lay.a);
  __nv_bfloat16* sDO = reinterpret_cast<__nv_bfloat16*>(smem + lay.b);
  float* sLse = reinterpret_cast<float*>(smem + lay.lse);
  float* sDelta = reinterpret_cast<float*>(smem + lay.delta);
  unsigned char* sKH = smem + lay.kh;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned char* wbuf = smem + lay.warp0 + warp * kBwdWarpBytes;
  __nv_bfloat16* stK = reinterpret_cast<__nv_bfloat16*>(wbuf);
  __nv_bfloat16* stV = stK + 16 * kLd;
  float* chS = reinterpret_cast<float*>(wbuf);
  float* chP = reinterpret_cast<float*>(wbuf + kChunkBytes);
  __nv_bfloat16* tP = reinterpret_cast<__nv_bfloat16*>(wbuf + 2 * kChunkBytes);
  __nv_bfloat16* tDS = reinterpret_cast<__nv_bfloat16*>(wbuf + 2 * kChunkBytes + kTileBytes);
  float* res = reinterpret_cast<float*>(wbuf);

  const long long bh = blockIdx.x / p.nsplit;
  const int split = static_cast<int>(blockIdx.x - bh * p.nsplit);
  const long long base = bh * L * kHD;
  const std::uint8_t* kh = p.key_hidden + (bh / p.heads) * L;

  stage_rows(sQ, p.q + base, 0, lpad, L, threadIdx.x, blockDim.x);
  stage_rows(sDO, p.dout + base, 0, lpad, L, threadIdx.x, blockDim.x);
  for (int i = threadIdx.x; i < lpad; i += blockDim.x) {
    const bool in = i < L;
    sLse[i] = in ? p.lse_in[bh * L + i] : 0.0f;
    sDelta[i] = in ? p.delta[bh * L + i] : 0.0f;
  }
  const bool all_hidden = stage_key_flags(sKH, kh, L, lpad);  // also a __syncthreads

  // This lane's part of each 16 (keys) x 16 (queries) chunk: key r, queries c0 .. c0 + 7.
  const int r = lane >> 1, c0 = (lane & 1) * 8;

  for (int t = split * kBwdWarps + warp; t < ntiles; t += p.nsplit * kBwdWarps) {
    const int key0 = t * 16;
    stage_rows(stK, p.k + base, key0, 16, L, lane, 32);
    stage_rows(stV, p.v + base, key0, 16, L, lane, 32);
    __syncwarp();
    FragA ka[kHD / 16], va[kHD / 16];
#pragma unroll
    for (int kk = 0; kk < kHD / 16; ++kk) {
      load_tile(ka[kk], stK + kk * 16, kLd);
      load_tile(va[kk], stV + kk * 16, kLd);
    }
    __syncwarp();
    const int key = key0 + r;
    const bool key_in = key < L;
    const bool k_hidden = key_in && sKH[key] != 0;

    FragC dkacc[kHD / 16], dvacc[kHD / 16];
#pragma unroll
    for (int n = 0; n < kHD / 16; ++n) {
      wmma::fill_fragment(dkacc[n], 0.0f);
      wmma::fill_fragment(dvacc[n], 0.0f);
    }
    for (int it = 0; it < ntiles; ++it) {
      chunk_pair(chS, chP, ka, va, sQ, sDO, it);  // S^T and dP^T chunks: (key, query)
      __syncwarp();
#pragma unroll
      for (int c = c0; c < c0 + 8; ++c) {
        const int i = it * 16 + c;
        float pr = 0.0f, ds = 0.0f;
        if (key_in && i < L) {
          const float x = mask_logit(chS[r * kChunkLd + c] * p.scale, p.rule, sKH[i] != 0,
                                     k_hidden, all_hidden);
          pr = expf(x - sLse[i]);
          ds = pr * (chP[r * kChunkLd + c] - sDelta[i]) * p.scale;
        }
        tP[r * kTileLd + c] = __float2bfloat16_rn(pr);
        tDS[r * kTileLd + c] = __float2bfloat16_rn(ds);
      }
      __syncwarp();
      FragA pa, dsa;
      load_tile(pa, tP, kTileLd);
      load_tile(dsa, tDS, kTileLd);
#pragma unroll
      for (int n = 0; n < kHD / 16; ++n) {
        FragBRow b;
        load_tile(b, sDO + it * 16 * kLd + n * 16, kLd);  // (i, d) = dO[i][d]
        wmma::mma_sync(dvacc[n], pa, b, dvacc[n]);
        load_tile(b, sQ + it * 16 * kLd + n * 16, kLd);  // (i, d) = Q[i][d]
        wmma::mma_sync(dkacc[n], dsa, b, dkacc[n]);
      }
    }
    write_acc(p.dk + base, res, kOutLd, dkacc, nullptr, key0, L, lane);
    write_acc(p.dv + base, res, kOutLd, dvacc, nullptr, key0, L, lane);
  }
#endif
}

}  // namespace tc
}  // namespace cuda
}  // namespace astromer_fast
