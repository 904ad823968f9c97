// Float vectors of N lanes (GCC vector extensions) and the small dense kernels built on them, for
// kernels compiled once per ISA level (cpu/isa.h): N = 16 for AVX-512 (one zmm), 8 for AVX2 (one
// ymm), 4 for the SSE2 baseline (one xmm). A vector as wide as the level's registers matters: GCC
// lowers a vector wider than the registers through the stack (a 16-lane vector on AVX2 ran the
// fused block's passes four times slower than an 8-lane one). Register blocking is explicit
// rather than left to the auto-vectoriser, which would need -ffast-math for the reductions.
//
// Every helper is always inlined, so it takes the ISA level of the function it is inlined into.
#pragma once

#include <cstdint>
#include <cstring>

// Always inlined, so the ABI notes about passing wide vectors by value are moot.
#pragma GCC diagnostic ignored "-Wpsabi"

#define AF_INLINE inline __attribute__((always_inline))

namespace astromer_fast {
namespace cpu {
namespace simd {

template <int N>
struct Lanes;
template <>
struct Lanes<4> {
  typedef float F __attribute__((vector_size(16)));
  typedef std::int32_t I __attribute__((vector_size(16)));
  typedef std::uint32_t U __attribute__((vector_size(16)));
  typedef std::uint16_t H __attribute__((vector_size(8)));
};
template <>
struct Lanes<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef std::int32_t I __attribute__((vector_size(32)));
  typedef std::uint32_t U __attribute__((vector_size(32)));
  typedef std::uint16_t H __attribute__((vector_size(16)));
};
template <>
struct Lanes<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef std::int32_t I __attribute__((vector_size(64)));
  typedef std::uint32_t U __attribute__((vector_size(64)));
  typedef std::uint16_t H __attribute__((vector_size(32)));
};

template <int N>
using VF = typename Lanes<N>::F;
template <int N>
using VI = typename Lanes<N>::I;
template <int N>
using VU = typename Lanes<N>::U;

constexpr std::int64_t RB = 4;  // rows per register block

template <int N>
AF_INLINE VF<N> load(const float* p) {
  VF<N> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <int N>
AF_INLINE void store(float* p, VF<N> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <int N>
AF_INLINE VF<N> splat(float x) {
  return VF<N>{} + x;
}

// bfloat16 storage: widen to float32, and round to nearest even as torch does (NaN stays a quiet
// NaN). The NaN test is on the bits, as a signed integer compare: every level has one, while an
// unordered float compare does not vectorise everywhere.
template <int N>
AF_INLINE VF<N> load(const std::uint16_t* p) {
  typename Lanes<N>::H h;
  std::memcpy(&h, p, sizeof(h));
  const VU<N> u = __builtin_convertvector(h, VU<N>) << 16;
  VF<N> f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
template <int N>
AF_INLINE void store(std::uint16_t* p, VF<N> v) {
  VU<N> u;
  std::memcpy(&u, &v, sizeof(u));
  const VU<N> nan = (VU<N>)((VI<N>)(u & 0x7fffffffu) > 0x7f800000);
  const VU<N> rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const VU<N> r = (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
  const typename Lanes<N>::H h = __builtin_convertvector(r, typename Lanes<N>::H);
  std::memcpy(p, &h, sizeof(h));
}

// exp(x) for x <= ~88, with x < -87 flushed to 0 (true values < 1.7e-38): Cephes expf
// (Cody-Waite reduction by ln 2, degree-5 minimax), ~1 ulp, branch-free.
template <int N>
AF_INLINE VF<N> exp(VF<N> x) {
  const VF<N> lo = splat<N>(-87.0f);
  const VI<N> under = x < lo;
  x = under ? lo : x;
  const VF<N> shifter = splat<N>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const VF<N> t = x * 1.44269504088896341f + shifter;
  const VF<N> n = t - shifter;
  VF<N> r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  VF<N> p = splat<N>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const VI<N> ni = (VI<N>)t - (VI<N>)shifter;
  const VI<N> e = (ni + 127) << 23;
  const VF<N> y = p * (VF<N>)e;
  return under ? splat<N>(0.0f) : y;
}

// Lane i swapped with lane i ^ step (step = N/2, ..., 1): the folds of a reduction tree.
#if defined(__clang__)
#define AF_SHUFFLE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define AF_SHUFFLE(v, ...) __builtin_shuffle(v, VI<N>{__VA_ARGS__})
#endif
template <int N>
AF_INLINE VF<N> swap_lanes(VF<N> v, int step) {
  if constexpr (N == 16) {
    switch (step) {
      case 8: return AF_SHUFFLE(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
      case 4: return AF_SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
      case 2: return AF_SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
      default: return AF_SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    }
  } else if constexpr (N == 8) {
    switch (step) {
      case 4: return AF_SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3);
      case 2: return AF_SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5);
      default: return AF_SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6);
    }
  } else {
    return step == 2 ? AF_SHUFFLE(v, 2, 3, 0, 1) : AF_SHUFFLE(v, 1, 0, 3, 2);
  }
}
#undef AF_SHUFFLE

template <int N>
AF_INLINE float reduce_add(VF<N> v) {
  for (int step = N / 2; step >= 1; step /= 2) v += swap_lanes<N>(v, step);
  return v[0];
}
template <int N>
AF_INLINE float reduce_max(VF<N> v) {
  for (int step = N / 2; step >= 1; step /= 2) {
    const VF<N> o = swap_lanes<N>(v, step);
    v = o > v ? o : v;
  }
  return v[0];
}

// C[r, j] = sum_x A[r, x] * Bt[x, j] for 4 rows r and ncols (a multiple of N) columns j.
template <int N>
AF_INLINE void abt_rows4(const float* __restrict__ A, std::int64_t lda,
                         const float* __restrict__ Bt, std::int64_t ldb, std::int64_t K,
                         std::int64_t ncols, float* __restrict__ C, std::int64_t ldc) {
  std::int64_t j = 0;
  for (; j + 2 * N <= ncols; j += 2 * N) {
    VF<N> c[RB][2] = {};
    for (std::int64_t x = 0; x < K; ++x) {
      const VF<N> b0 = load<N>(Bt + x * ldb + j);
      const VF<N> b1 = load<N>(Bt + x * ldb + j + N);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        const float a = A[r * lda + x];
        c[r][0] += a * b0;
        c[r][1] += a * b1;
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      store<N>(C + r * ldc + j, c[r][0]);
      store<N>(C + r * ldc + j + N, c[r][1]);
    }
  }
  for (; j < ncols; j += N) {
    VF<N> c[RB] = {};
    for (std::int64_t x = 0; x < K; ++x) {
      const VF<N> b0 = load<N>(Bt + x * ldb + j);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) c[r] += A[r * lda + x] * b0;
    }
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) store<N>(C + r * ldc + j, c[r]);
  }
}

// C[r, c] = rs[r] * sum_{x < n} A[r, x] * B[x, c] for 4 rows r and the N*NV columns c at C, B.
template <int N, int NV>
AF_INLINE void ab_rows4(const float* __restrict__ A, std::int64_t lda,
                        const float* __restrict__ B, std::int64_t ldb, std::int64_t n,
                        float* __restrict__ C, std::int64_t ldc, const float* rs) {
  VF<N> acc[RB][NV] = {};
  for (std::int64_t x = 0; x < n; ++x) {
    VF<N> b[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) b[c] = load<N>(B + x * ldb + c * N);
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
    for (int c = 0; c < NV; ++c) store<N>(C + r * ldc + c * N, acc[r][c] * s);
  }
}

// ab_rows4 over all hd columns (a multiple of N), in chunks that keep the 4 x NV accumulators in
// registers: 4 vectors wide with 32 registers (AVX-512), 2 with 16; C's rows are hd apart.
template <int N>
AF_INLINE void ab_rows4_all(const float* A, std::int64_t lda, const float* B, std::int64_t ldb,
                            std::int64_t hd, std::int64_t n, float* C, const float* rs) {
  constexpr int kMax = N == 16 ? 4 : 2;
  for (std::int64_t d0 = 0; d0 < hd; d0 += kMax * N) {
    const std::int64_t nv = (hd - d0) >= kMax * N ? kMax : (hd - d0) / N;
    if (nv == 4) ab_rows4<N, (kMax >= 4 ? 4 : 1)>(A, lda, B + d0, ldb, n, C + d0, hd, rs);
    else if (nv == 3) ab_rows4<N, (kMax >= 3 ? 3 : 1)>(A, lda, B + d0, ldb, n, C + d0, hd, rs);
    else if (nv == 2) ab_rows4<N, 2>(A, lda, B + d0, ldb, n, C + d0, hd, rs);
    else ab_rows4<N, 1>(A, lda, B + d0, ldb, n, C + d0, hd, rs);
  }
}

// s[j] = (s[j] * scale + b1[j]) + b2[j] for j < np (a multiple of N): the mask terms of
// cpu/attention_keys.h; returns the row maximum.
template <int N>
AF_INLINE float biased_row(float* __restrict__ s, const float* __restrict__ b1,
                           const float* __restrict__ b2, std::int64_t np, float scale) {
  VF<N> m = splat<N>(-__builtin_inff());
  for (std::int64_t j = 0; j < np; j += N) {
    const VF<N> x = (load<N>(s + j) * scale + load<N>(b1 + j)) + load<N>(b2 + j);
    store<N>(s + j, x);
    m = x > m ? x : m;
  }
  return reduce_max<N>(m);
}

}  // namespace simd
}  // namespace cpu
}  // namespace astromer_fast
