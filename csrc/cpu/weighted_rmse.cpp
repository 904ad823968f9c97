#include "cpu/weighted_rmse.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu/bf16.h"
#include "cpu/common.h"
#include "cpu/parallel.h"

namespace astromer_fast {
namespace cpu {
namespace {

constexpr int kLanes = 8;
// Bit pattern of 1e-8f, the floor the errors are clamped to before 1/e (as the reference does).
constexpr std::int32_t kMinErrBits = 0x322bcc77;  // independent accumulators: vectorisable, and a fixed summation order

struct WindowResult {
  double mse;   // mse_b (valid only when has)
  bool has;     // c_b > 0
};

inline float bits_float(std::int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

// One window, in two passes over it, every loop branch-free so that GCC vectorises it (it inlines
// no helper into a target clone, hence the repetition). Pass 1: the probed count and, with errors,
// inv = 1/max(e, 1e-8) into `scratch` and its min/max over valid observations. inv is >= 0, and
// non-negative floats order like their bit patterns as int32, so the min/max reductions run on
// integers, which vectorise without -ffast-math. Pass 2: the weighted squared errors into
// `scratch` (summed afterwards in 8 double lanes, a fixed order) and dir = w p (yhat - y) / c.
template <bool kBf16, bool kErr, bool kDir>
ASTROMER_FAST_CLONES
WindowResult window(const void* __restrict__ pred, const float* __restrict__ y,
                    const float* __restrict__ e, const std::uint8_t* __restrict__ p,
                    const std::uint8_t* __restrict__ v, std::int64_t off, std::int64_t n,
                    float* __restrict__ dir, float* __restrict__ scratch) {
  std::int32_t count = 0;
  for (std::int64_t l = 0; l < n; ++l) count += p[l];
  if (count == 0) {
    if (kDir)
      for (std::int64_t l = 0; l < n; ++l) dir[l] = 0.0f;
    return {0.0, false};
  }

  // w = v * ((inv - lo) * a + b): a = 1/span, b = 1e-3 normally; a = 0, b = 1 when flat (all 1/e
  // equal, or nothing valid) and without errors.
  float lo = 0.0f, a = 0.0f, b = 1.0f;
  if (kErr) {
    std::int32_t lo_bits = 0x7f7fffff, hi_bits = -1;  // FLT_MAX, and below every inv
    for (std::int64_t l = 0; l < n; ++l) {
      // max(e, 1e-8) on the bit patterns: negative floats are negative int32s, and a float
      // compare would keep GCC from vectorising under the default -ftrapping-math.
      std::int32_t eb;
      std::memcpy(&eb, e + l, sizeof(eb));
      eb = eb < kMinErrBits ? kMinErrBits : eb;
      float ec;
      std::memcpy(&ec, &eb, sizeof(ec));
      const float inv = 1.0f / ec;
      scratch[l] = inv;
      std::int32_t bits;
      std::memcpy(&bits, &inv, sizeof(bits));
      const std::int32_t ok = -static_cast<std::int32_t>(v[l] != 0);  // all ones where valid
      lo_bits = std::min(lo_bits, (bits & ok) | (0x7f7fffff & ~ok));
      hi_bits = std::max(hi_bits, bits | ~ok);
    }
    if (hi_bits > lo_bits) {
      lo = bits_float(lo_bits);
      const float span = bits_float(hi_bits) - lo;
      if (span > 0.0f) {
        a = 1.0f / span;
        b = 1e-3f;
      }
    }
  }
  const float inv_count = 1.0f / static_cast<float>(count);

  for (std::int64_t l = 0; l < n; ++l) {
    float w = static_cast<float>(v[l]);
    if (kErr) w *= (scratch[l] - lo) * a + b;
    const float wp = w * static_cast<float>(p[l]);
    float yh;
    if constexpr (kBf16) {
      const std::uint32_t bits = static_cast<std::uint32_t>(static_cast<const std::uint16_t*>(pred)[off + l]) << 16;
      std::memcpy(&yh, &bits, sizeof(yh));
    } else {
      yh = static_cast<const float*>(pred)[off + l];
    }
    const float d = yh - y[l];
    scratch[l] = wp * d * d;
    if (kDir) dir[l] = wp * d * inv_count;
  }
  double s8[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t l = 0;
  for (; l + kLanes <= n; l += kLanes)
    for (int k = 0; k < kLanes; ++k) s8[k] += static_cast<double>(scratch[l + k]);
  for (int k = 0; l < n; ++l, ++k) s8[k] += static_cast<double>(scratch[l]);
  double num = 0.0;
  for (int k = 0; k < kLanes; ++k) num += s8[k];
  return {num / static_cast<double>(count), true};
}

void validate(const WeightedRmseArgs& a) {
  if (a.rows < 0 || a.length < 0)
    throw std::invalid_argument("weighted_rmse: rows and length must be >= 0");
  if (!a.loss) throw std::invalid_argument("weighted_rmse: loss must not be null");
  if (a.rows > 0 && a.length > 0 && (!a.pred || !a.target || !a.probed))
    throw std::invalid_argument("weighted_rmse: pred, target and probed must not be null");
}

template <bool kBf16, bool kErr, bool kDir>
void run(const WeightedRmseArgs& a, int num_threads) {
  const std::int64_t rows = a.rows, n = a.length;
  std::vector<WindowResult> part(static_cast<std::size_t>(rows));
  const std::uint8_t* valid = a.valid ? a.valid : a.probed;
  // ~16k observations per task keeps thread start-up well below the work.
  const std::int64_t grain = std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(n, 1));
  parallel_for(rows, grain, num_threads, [&](std::int64_t r0, std::int64_t r1) {
    std::vector<float> scratch(static_cast<std::size_t>(n));
    for (std::int64_t r = r0; r < r1; ++r) {
      const std::int64_t off = r * n;
      part[static_cast<std::size_t>(r)] = window<kBf16, kErr, kDir>(
          a.pred, a.target + off, kErr ? a.err + off : nullptr, a.probed + off, valid + off, off,
          n, kDir ? a.dir + off : nullptr, scratch.data());
    }
  });
  // Second stage: window order, one thread, double accumulation.
  double sum = 0.0;
  std::int64_t n_has = 0;
  for (const WindowResult& w : part) {
    if (w.has) {
      sum += w.mse;
      ++n_has;
    }
  }
  float loss = 0.0f, scale = 0.0f;
  if (n_has > 0) {
    loss = static_cast<float>(std::sqrt(sum / static_cast<double>(n_has) + 1e-12));
    scale = static_cast<float>(1.0 / (static_cast<double>(loss) * static_cast<double>(n_has)));
  }
  *a.loss = loss;
  if (a.scale) *a.scale = scale;
}

template <bool kBf16, bool kErr>
void run_dir(const WeightedRmseArgs& a, int num_threads) {
  if (a.dir)
    run<kBf16, kErr, true>(a, num_threads);
  else
    run<kBf16, kErr, false>(a, num_threads);
}

template <bool kBf16>
void run_err(const WeightedRmseArgs& a, int num_threads) {
  if (a.err)
    run_dir<kBf16, true>(a, num_threads);
  else
    run_dir<kBf16, false>(a, num_threads);
}

ASTROMER_FAST_CLONES
void scale_f32(const float* __restrict__ dir, float s, float* __restrict__ out, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) out[i] = dir[i] * s;
}

ASTROMER_FAST_CLONES
void scale_bf16(const float* __restrict__ dir, float s, std::uint16_t* __restrict__ out,
                std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(dir[i] * s);
}

}  // namespace

void weighted_rmse_backward(const float* dir, float grad_loss, float scale, void* grad,
                            bool grad_bf16, std::int64_t n, int num_threads) {
  if (n < 0) throw std::invalid_argument("weighted_rmse_backward: n must be >= 0");
  if (n > 0 && (!dir || !grad))
    throw std::invalid_argument("weighted_rmse_backward: dir and grad must not be null");
  const float s = grad_loss * scale;
  // Memory-bound: a thread is worth starting only for a few hundred KB of work.
  parallel_for(n, 1 << 16, num_threads, [&](std::int64_t i0, std::int64_t i1) {
    if (grad_bf16)
      scale_bf16(dir + i0, s, static_cast<std::uint16_t*>(grad) + i0, i1 - i0);
    else
      scale_f32(dir + i0, s, static_cast<float*>(grad) + i0, i1 - i0);
  });
}

void weighted_rmse_forward(const WeightedRmseArgs& a, int num_threads) {
  validate(a);
  if (a.rows == 0 || a.length == 0) {
    *a.loss = 0.0f;
    if (a.scale) *a.scale = 0.0f;
    if (a.dir) std::fill(a.dir, a.dir + a.rows * a.length, 0.0f);
    return;
  }
  if (a.pred_bf16)
    run_err<true>(a, num_threads);
  else
    run_err<false>(a, num_threads);
}

}  // namespace cpu
}  // namespace astromer_fast
