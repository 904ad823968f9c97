#include "cpu/input_embedding.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/bf16.h"
#include "cpu/common.h"
#include "cpu/parallel.h"

namespace astromer_fast {
namespace cpu {
namespace {

// embed_row is cloned (ASTROMER_FAST_CLONES, cpu/common.h): the SSE2 baseline holds 2 doubles per
// vector, the x86-64-v3 (AVX2+FMA) clone 4.

// One output row: out[j] = sin(t*omega[j] + (j&1)*pi/2) + mv*w[j] + b[j].
//
// |t| reaches thousands of days, so t*omega can be ~3e3 rad, where a float argument is already
// off by ~1e-4. The reduction to [-pi/4, pi/4] is therefore done in double, followed by short
// Taylor series accurate to ~1e-14 there. Cosine channels are sines one quadrant further on,
// which is exact. Everything is spelled out in this one function, without libm calls or
// branches, because GCC neither inlines a helper into a target clone nor vectorises a loop with
// control flow.
ASTROMER_FAST_CLONES
void embed_row(double t, float mv, const double* __restrict__ omega, const float* __restrict__ w,
               const float* __restrict__ b, std::int64_t dim, float* __restrict__ out) {
  constexpr double kTwoOverPi = 0.63661977236758134308;
  // pi/2 split so that q * kPio2Hi is exact for |q| < 2^20 (kPio2Hi has 33 significant bits).
  constexpr double kPio2Hi = 1.5707963267341256141662597656250;
  constexpr double kPio2Lo = 6.07710050650619224932e-11;  // pi/2 - kPio2Hi (fdlibm pio2_1t)
  // Adding 1.5 * 2^52 rounds to the nearest integer and leaves it in the low mantissa bits.
  constexpr double kShifter = 6755399441055744.0;
  const double md = static_cast<double>(mv);

  for (std::int64_t j = 0; j < dim; ++j) {
    const double x = t * omega[j];
    const double shifted = x * kTwoOverPi + kShifter;
    std::uint64_t quadrant;
    std::memcpy(&quadrant, &shifted, sizeof(quadrant));
    quadrant += static_cast<std::uint64_t>(j & 1);
    const double q = shifted - kShifter;
    const double r = (x - q * kPio2Hi) - q * kPio2Lo;

    const double z = r * r;
    const double s =
        r + r * z * (-1.0 / 6 + z * (1.0 / 120 + z * (-1.0 / 5040 + z * (1.0 / 362880 +
            z * (-1.0 / 39916800 + z * (1.0 / 6227020800.0))))));
    const double c =
        1.0 + z * (-0.5 + z * (1.0 / 24 + z * (-1.0 / 720 + z * (1.0 / 40320 +
            z * (-1.0 / 3628800 + z * (1.0 / 479001600 + z * (-1.0 / 87178291200.0)))))));
    // Quadrant select and sign flip on the bit patterns (a ternary would be control flow).
    std::uint64_t sb, cb;
    std::memcpy(&sb, &s, sizeof(sb));
    std::memcpy(&cb, &c, sizeof(cb));
    const std::uint64_t pick_c = std::uint64_t{0} - (quadrant & 1u);
    const std::uint64_t vb = ((sb & ~pick_c) | (cb & pick_c)) ^ ((quadrant & 2u) << 62);
    double pe;
    std::memcpy(&pe, &vb, sizeof(pe));
    // The float*float product is exact in double: the only roundings left are the two sums
    // and the final conversion to float.
    out[j] = static_cast<float>(pe + (md * static_cast<double>(w[j]) + static_cast<double>(b[j])));
  }
}

void validate(const InputEmbeddingArgs& a) {
  if (a.rows < 0) throw std::invalid_argument("input_embedding: rows must be >= 0");
  if (a.dim <= 0 || a.dim % 2 != 0)
    throw std::invalid_argument("input_embedding: dim must be positive and even, got " +
                                std::to_string(a.dim));
  if (!(a.base > 0.0) || !std::isfinite(a.base))
    throw std::invalid_argument("input_embedding: base must be finite and > 0");
  if (a.rows > 0 && (!a.t || !a.m || (!a.out == !a.out_bf16)))
    throw std::invalid_argument("input_embedding: t and m must not be null, and exactly one of "
                                "out and out_bf16 must be given");
  if (!a.w || !a.b) throw std::invalid_argument("input_embedding: w and b must not be null");
}

}  // namespace

void input_embedding_forward(const InputEmbeddingArgs& a, int num_threads) {
  validate(a);
  if (a.rows == 0) return;
  const std::int64_t dim = a.dim;

  std::vector<double> omega(static_cast<std::size_t>(dim));
  for (std::int64_t j = 0; j < dim; ++j)
    omega[static_cast<std::size_t>(j)] =
        std::pow(a.base, -2.0 * static_cast<double>(j) / static_cast<double>(dim));
  const double* om = omega.data();

  const bool use_token = a.token != nullptr && a.hidden != nullptr;
  const float token = use_token ? *a.token : 0.0f;

  // ~32k outputs per task keeps thread start-up (tens of microseconds) well below the work.
  const std::int64_t grain_rows = std::max<std::int64_t>(1, 32768 / dim);
  parallel_for(a.rows, grain_rows, num_threads, [&](std::int64_t r0, std::int64_t r1) {
    std::vector<float> row(a.out_bf16 ? static_cast<std::size_t>(dim) : 0);
    for (std::int64_t r = r0; r < r1; ++r) {
      const float mv = (use_token && a.hidden[r]) ? token : a.m[r];
      float* dst = a.out_bf16 ? row.data() : a.out + r * dim;
      embed_row(static_cast<double>(a.t[r]), mv, om, a.w, a.b, dim, dst);
      if (a.out_bf16)
        for (std::int64_t j = 0; j < dim; ++j) a.out_bf16[r * dim + j] = float_to_bf16(dst[j]);
    }
  });
}

}  // namespace cpu
}  // namespace astromer_fast
