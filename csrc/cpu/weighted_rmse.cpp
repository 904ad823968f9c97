#include "cpu/weighted_rmse.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu/parallel.h"

namespace astromer_fast {
namespace cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__) && !defined(ASTROMER_FAST_NO_CLONES)
#define ASTROMER_FAST_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define ASTROMER_FAST_CLONES
#endif

constexpr int kLanes = 8;  // independent accumulators: vectorisable, and a fixed summation order

inline float bf16_to_float(std::uint16_t bits) {
  const std::uint32_t u = static_cast<std::uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <bool kBf16>
inline float load_pred(const void* p, std::int64_t i) {
  if constexpr (kBf16) {
    return bf16_to_float(static_cast<const std::uint16_t*>(p)[i]);
  } else {
    return static_cast<const float*>(p)[i];
  }
}

struct WindowResult {
  double mse;   // mse_b (valid only when has)
  bool has;     // c_b > 0
};

// One window: min/max of 1/e over valid observations and the probed count, then the weighted sum
// and (optionally) the gradient direction. Fixed-order arithmetic only: no dependence on threads.
template <bool kBf16>
ASTROMER_FAST_CLONES
WindowResult window(const void* __restrict__ pred, const float* __restrict__ y,
                    const float* __restrict__ e, const std::uint8_t* __restrict__ p,
                    const std::uint8_t* __restrict__ v, std::int64_t off, std::int64_t n,
                    float* __restrict__ dir) {
  // Pass 1: lo/hi of inv over valid observations, count of probed.
  float lo8[kLanes], hi8[kLanes];
  std::int64_t c8[kLanes];
  for (int k = 0; k < kLanes; ++k) {
    lo8[k] = FLT_MAX;
    hi8[k] = -FLT_MAX;
    c8[k] = 0;
  }
  std::int64_t l = 0;
  for (; l + kLanes <= n; l += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      c8[k] += p[l + k];
      if (e) {
        const float inv = 1.0f / std::max(e[l + k], 1e-8f);
        const bool ok = v[l + k] != 0;
        lo8[k] = std::min(lo8[k], ok ? inv : FLT_MAX);
        hi8[k] = std::max(hi8[k], ok ? inv : -FLT_MAX);
      }
    }
  }
  for (int k = 0; l < n; ++l, ++k) {
    c8[k] += p[l];
    if (e) {
      const float inv = 1.0f / std::max(e[l], 1e-8f);
      const bool ok = v[l] != 0;
      lo8[k] = std::min(lo8[k], ok ? inv : FLT_MAX);
      hi8[k] = std::max(hi8[k], ok ? inv : -FLT_MAX);
    }
  }
  float lo = FLT_MAX, hi = -FLT_MAX;
  std::int64_t count = 0;
  for (int k = 0; k < kLanes; ++k) {
    lo = std::min(lo, lo8[k]);
    hi = std::max(hi, hi8[k]);
    count += c8[k];
  }
  if (count == 0) {
    if (dir) std::fill(dir, dir + n, 0.0f);
    return {0.0, false};
  }
  // With no valid observation hi - lo = -inf: flat, and every weight is 0 anyway.
  const float span = hi - lo;
  const bool flat = e == nullptr || span <= 0.0f;
  const float inv_count = 1.0f / static_cast<float>(count);

  // Pass 2: sum_l w p (y - yhat)^2 in double lanes, and dir = w p (yhat - y) / c.
  double s8[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  auto term = [&](std::int64_t i, int k) {
    float w = static_cast<float>(v[i]);
    if (!flat) w *= (1.0f / std::max(e[i], 1e-8f) - lo) / span + 1e-3f;
    const float wp = w * static_cast<float>(p[i]);
    const float d = load_pred<kBf16>(pred, off + i) - y[i];
    s8[k] += static_cast<double>(wp * d * d);
    if (dir) dir[i] = wp * d * inv_count;
  };
  l = 0;
  for (; l + kLanes <= n; l += kLanes)
    for (int k = 0; k < kLanes; ++k) term(l + k, k);
  for (int k = 0; l < n; ++l, ++k) term(l, k);
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

template <bool kBf16>
void run(const WeightedRmseArgs& a, int num_threads) {
  const std::int64_t rows = a.rows, n = a.length;
  std::vector<WindowResult> part(static_cast<std::size_t>(rows));
  const std::uint8_t* valid = a.valid ? a.valid : a.probed;
  // ~16k observations per task keeps thread start-up well below the work.
  const std::int64_t grain = std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(n, 1));
  parallel_for(rows, grain, num_threads, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const std::int64_t off = r * n;
      part[static_cast<std::size_t>(r)] = window<kBf16>(
          a.pred, a.target + off, a.err ? a.err + off : nullptr, a.probed + off, valid + off, off,
          n, a.dir ? a.dir + off : nullptr);
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

}  // namespace

void weighted_rmse_forward(const WeightedRmseArgs& a, int num_threads) {
  validate(a);
  if (a.rows == 0 || a.length == 0) {
    *a.loss = 0.0f;
    if (a.scale) *a.scale = 0.0f;
    if (a.dir) std::fill(a.dir, a.dir + a.rows * a.length, 0.0f);
    return;
  }
  if (a.pred_bf16)
    run<true>(a, num_threads);
  else
    run<false>(a, num_threads);
}

}  // namespace cpu
}  // namespace astromer_fast
