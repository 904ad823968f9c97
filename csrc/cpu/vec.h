// Float vectors of 16 lanes (GCC vector extensions) and the small dense kernels built on them,
// shared by the attention kernels and the fused encoder block.
#pragma once

#include <cstdint>
#include <cstring>

// Vector-extension helpers are always inlined, so the ABI note about passing 64-byte vectors is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace astromer_fast {
namespace cpu {

// The callers are compiled for several ISA levels (target clones or target attributes, see
// cpu/common.h and cpu/isa.h); these helpers are always inlined into them, so each level gets its own
// code. The inner loops use GCC vector extensions of 16 floats, which
// each clone lowers to one zmm, two ymm or four xmm registers, so the register blocking below is
// explicit rather than left to the auto-vectoriser (which would need -ffast-math for reductions).
#define AF_INLINE inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(64)));
typedef std::int32_t vi __attribute__((vector_size(64)));
constexpr std::int64_t W = 16;  // floats per vf
constexpr std::int64_t RB = 4;  // rows per register block

AF_INLINE vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
AF_INLINE void storev(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
AF_INLINE vf splat(float x) { return vf{} + x; }

// exp(x) for x <= ~88, with x < -87 flushed to 0 (true values < 1.7e-38): Cephes expf
// (Cody-Waite reduction by ln 2, degree-5 minimax), ~1 ulp, branch-free.
AF_INLINE vf vexp(vf x) {
  const vf lo = splat(-87.0f);
  const vi under = x < lo;
  x = under ? lo : x;
  const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = x * 1.44269504088896341f + shifter;
  const vf n = t - shifter;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vi ni = (vi)t - (vi)shifter;
  const vi e = (ni + 127) << 23;
  const vf y = p * (vf)e;
  return under ? splat(0.0f) : y;
}

AF_INLINE float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}
AF_INLINE float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// The same reductions as a tree of lane shuffles: 4 dependent steps instead of 15 (hsum and hmax
// above keep their sequential order, which the bits of cpu/masked_attention.cpp depend on).
#if defined(__clang__)
#define AF_SHUFFLE16(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define AF_SHUFFLE16(v, ...) __builtin_shuffle(v, vi{__VA_ARGS__})
#endif
AF_INLINE vf fold_halves(vf v, int step) {
  switch (step) {
    case 8: return AF_SHUFFLE16(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    case 4: return AF_SHUFFLE16(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    case 2: return AF_SHUFFLE16(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    default: return AF_SHUFFLE16(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  }
}
AF_INLINE float reduce_add(vf v) {
  for (int step = 8; step >= 1; step /= 2) v += fold_halves(v, step);
  return v[0];
}
AF_INLINE float reduce_max(vf v) {
  for (int step = 8; step >= 1; step /= 2) {
    const vf o = fold_halves(v, step);
    v = o > v ? o : v;
  }
  return v[0];
}

// C[r, j] = sum_x A[r, x] * Bt[x, j] for 4 rows r and ncols (a multiple of 16) columns j.
AF_INLINE void abt_rows4(const float* __restrict__ A, std::int64_t lda, const float* __restrict__ Bt,
                         std::int64_t ldb, std::int64_t K, std::int64_t ncols, float* __restrict__ C,
                         std::int64_t ldc) {
  std::int64_t j = 0;
  for (; j + 2 * W <= ncols; j += 2 * W) {
    vf c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
    for (std::int64_t x = 0; x < K; ++x) {
      const vf b0 = loadv(Bt + x * ldb + j);
      const vf b1 = loadv(Bt + x * ldb + j + W);
      const float a0 = A[x], a1 = A[lda + x], a2 = A[2 * lda + x], a3 = A[3 * lda + x];
      c00 += a0 * b0; c01 += a0 * b1;
      c10 += a1 * b0; c11 += a1 * b1;
      c20 += a2 * b0; c21 += a2 * b1;
      c30 += a3 * b0; c31 += a3 * b1;
    }
    storev(C + j, c00); storev(C + j + W, c01);
    storev(C + ldc + j, c10); storev(C + ldc + j + W, c11);
    storev(C + 2 * ldc + j, c20); storev(C + 2 * ldc + j + W, c21);
    storev(C + 3 * ldc + j, c30); storev(C + 3 * ldc + j + W, c31);
  }
  for (; j < ncols; j += W) {
    vf c0 = {}, c1 = {}, c2 = {}, c3 = {};
    for (std::int64_t x = 0; x < K; ++x) {
      const vf b0 = loadv(Bt + x * ldb + j);
      c0 += A[x] * b0; c1 += A[lda + x] * b0; c2 += A[2 * lda + x] * b0; c3 += A[3 * lda + x] * b0;
    }
    storev(C + j, c0); storev(C + ldc + j, c1); storev(C + 2 * ldc + j, c2); storev(C + 3 * ldc + j, c3);
  }
}

// C[r, c] = rs[r] * sum_{x < n} A[r, x] * B[x, c] for 4 rows r and the 16*NV columns c at C, B.
template <int NV>
AF_INLINE void ab_rows4(const float* __restrict__ A, std::int64_t lda, const float* __restrict__ B,
                        std::int64_t ldb, std::int64_t n, float* __restrict__ C, std::int64_t ldc,
                        const float* rs) {
  vf acc[RB][NV];
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = vf{};
  for (std::int64_t x = 0; x < n; ++x) {
    vf b[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) b[c] = loadv(B + x * ldb + c * W);
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const float a = A[r * lda + x];
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] += a * b[c];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r) {
    const float s = rs ? rs[r] : 1.0f;
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) storev(C + r * ldc + c * W, acc[r][c] * s);
  }
}

// ab_rows4 over all hd columns, in chunks of up to 64; B's rows are ldb apart, C's hd apart.
AF_INLINE void ab_rows4_all(const float* A, std::int64_t lda, const float* B, std::int64_t ldb,
                            std::int64_t hd, std::int64_t n, float* C, const float* rs) {
  for (std::int64_t d0 = 0; d0 < hd; d0 += 4 * W) {
    switch ((hd - d0) >= 4 * W ? 4 : (hd - d0) / W) {
      case 4: ab_rows4<4>(A, lda, B + d0, ldb, n, C + d0, hd, rs); break;
      case 3: ab_rows4<3>(A, lda, B + d0, ldb, n, C + d0, hd, rs); break;
      case 2: ab_rows4<2>(A, lda, B + d0, ldb, n, C + d0, hd, rs); break;
      default: ab_rows4<1>(A, lda, B + d0, ldb, n, C + d0, hd, rs); break;
    }
  }
}

// dst (cols x rows) = src (rows x cols) transposed; both multiples of 16, and 16x16 tiles keep
// both sides in cache lines.
inline void transpose(const float* __restrict__ src, float* __restrict__ dst, std::int64_t rows,
                      std::int64_t cols) {
  for (std::int64_t i0 = 0; i0 < rows; i0 += W)
    for (std::int64_t j0 = 0; j0 < cols; j0 += W)
      for (std::int64_t i = i0; i < i0 + W; ++i)
        for (std::int64_t j = j0; j < j0 + W; ++j) dst[j * rows + i] = src[i * cols + j];
}

inline std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

}  // namespace cpu
}  // namespace astromer_fast
