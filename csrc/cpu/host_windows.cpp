// Cleaning and windowing of light curves read in place from Arrow buffers (see host_windows.h).
// Bit-identity with the numpy reference (astromer_fast/data/preprocess.py) rests on three things:
// the same operations in the same order and precision, numpy's pairwise summation reproduced
// exactly (pairwise_sum below), and no contraction of a multiply and an add into an FMA (this
// file is compiled with -ffp-contract=off, and has no such pair anyway).
#include "cpu/host_windows.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace astromer_fast {
namespace cpu {
namespace {

inline bool bit_set(const std::uint8_t* bits, std::int64_t i) {
  return (bits[i >> 3] >> (i & 7)) & 1;
}

// n values of `col` from logical index `first` into dst, converted to Out; NaN where the value or
// its parent struct is null (what the numpy path gets from cast + fill_null(NaN)).
template <class Out>
void load_values(const ObsColumn& col, std::int64_t first, std::int64_t n, Out* dst) {
  const std::int64_t p = col.offset + first;
  if (col.is_f64) {
    const double* v = static_cast<const double*>(col.values) + p;
    for (std::int64_t j = 0; j < n; ++j) dst[j] = static_cast<Out>(v[j]);
  } else {
    const float* v = static_cast<const float*>(col.values) + p;
    for (std::int64_t j = 0; j < n; ++j) dst[j] = static_cast<Out>(v[j]);
  }
  const Out nan = std::numeric_limits<Out>::quiet_NaN();
  if (col.valid_bits != nullptr) {
    for (std::int64_t j = 0; j < n; ++j)
      if (!bit_set(col.valid_bits, p + j)) dst[j] = nan;
  }
  if (col.parent_bits != nullptr) {
    const std::int64_t q = col.parent_offset + first;
    for (std::int64_t j = 0; j < n; ++j)
      if (!bit_set(col.parent_bits, q + j)) dst[j] = nan;
  }
}

// numpy's pairwise summation of n float64 values (numpy/_core/src/umath/loops_utils.h.src), the
// order of every addition kept: np.sum over a contiguous row computes 0.0 + pairwise_sum(row).
double pairwise_sum(const double* a, std::int64_t n) {
  if (n < 8) {
    double res = 0.0;
    for (std::int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    std::int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  std::int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

// Windows of a cleaned curve of n observations (0 when it is too short to embed).
inline std::int64_t window_count(std::int64_t n, std::int64_t window, std::int64_t min_obs,
                                 int mode) {
  if (n < std::max<std::int64_t>(min_obs, 1)) return 0;
  return mode == 0 ? n / window + 1 : (n + window - 1) / window;
}

// Start of window k of a curve of n observations (make_windows / window_starts).
inline std::int64_t window_start(std::int64_t n, std::int64_t k, std::int64_t window, int mode) {
  const std::int64_t s = k * window;
  return mode == 0 ? std::min(s, std::max<std::int64_t>(n - window, 0)) : s;
}

void check_column(const ObsColumn& col, const char* name, bool required) {
  if (col.values == nullptr) {
    if (required) throw std::invalid_argument(std::string(name) + " values are required");
    return;
  }
  if (col.starts == nullptr) throw std::invalid_argument(std::string(name) + " starts missing");
}

}  // namespace

std::int64_t host_clean(const HostCleanArgs& a) {
  if (a.n_curves < 0 || a.window < 1 || a.min_obs < 0 || (a.mode != 0 && a.mode != 1))
    throw std::invalid_argument("host_clean: bad sizes, window, min_obs or mode");
  check_column(a.time, "time", true);
  check_column(a.mag, "mag", true);
  check_column(a.err, "err", false);
  if (a.lengths == nullptr || a.scratch_offsets == nullptr || a.clean_time == nullptr ||
      a.clean_mag == nullptr || a.n_out == nullptr || a.nonfinite == nullptr ||
      a.out_of_range == nullptr || a.nonpositive_err == nullptr ||
      a.duplicate_time == nullptr || a.resorted == nullptr || a.windows_per_curve == nullptr)
    throw std::invalid_argument("host_clean: a buffer is missing");

  const bool has_err = a.err.values != nullptr;
  const double time_limit = a.time_limit;
  // numpy compares the float32 magnitudes with the limit in float32 (NEP 50).
  const float mag_limit = static_cast<float>(a.mag_limit);
  std::vector<double> time_in;
  std::vector<float> mag_in, err_in;
  std::vector<std::pair<double, float>> to_sort;
  std::int64_t total_windows = 0;

  for (std::int64_t c = 0; c < a.n_curves; ++c) {
    const std::int64_t n = a.lengths[c];
    if (n < 0 || a.scratch_offsets[c + 1] - a.scratch_offsets[c] < n)
      throw std::invalid_argument("host_clean: negative length or scratch too small");
    if (static_cast<std::int64_t>(time_in.size()) < n) {
      time_in.resize(n);
      mag_in.resize(n);
      if (has_err) err_in.resize(n);
    }
    load_values(a.time, a.time.starts[c], n, time_in.data());
    load_values(a.mag, a.mag.starts[c], n, mag_in.data());
    if (has_err) load_values(a.err, a.err.starts[c], n, err_in.data());

    double* out_t = a.clean_time + a.scratch_offsets[c];
    float* out_m = a.clean_mag + a.scratch_offsets[c];
    std::int64_t kept = 0, nonfinite = 0, out_of_range = 0, nonpositive = 0;
    bool decreasing = false;
    // Reasons are exclusive, in this order: non-finite, out of range, non-positive error.
    for (std::int64_t j = 0; j < n; ++j) {
      const double t = time_in[j];
      const float m = mag_in[j];
      bool finite = std::isfinite(t) && std::isfinite(m);
      bool positive = true;
      if (has_err) {
        const float e = err_in[j];
        finite = finite && std::isfinite(e);
        positive = e > 0.0f;
      }
      const bool in_range = std::fabs(t) <= time_limit && std::fabs(m) <= mag_limit;
      nonfinite += !finite;
      out_of_range += finite && !in_range;
      nonpositive += finite && in_range && !positive;
      if (finite && in_range && positive) {
        if (kept > 0 && t < out_t[kept - 1]) decreasing = true;
        out_t[kept] = t;
        out_m[kept] = m;
        ++kept;
      }
    }
    if (decreasing) {  // stable: equal times keep input order, so "first" is first in the input
      to_sort.resize(kept);
      for (std::int64_t j = 0; j < kept; ++j) to_sort[j] = {out_t[j], out_m[j]};
      std::stable_sort(to_sort.begin(), to_sort.end(),
                       [](const auto& x, const auto& y) { return x.first < y.first; });
      for (std::int64_t j = 0; j < kept; ++j) {
        out_t[j] = to_sort[j].first;
        out_m[j] = to_sort[j].second;
      }
    }
    // Repeated times: keep the first of each run of equal times.
    std::int64_t unique = kept > 0 ? 1 : 0;
    for (std::int64_t j = 1; j < kept; ++j) {
      if (out_t[j] == out_t[unique - 1]) continue;
      out_t[unique] = out_t[j];
      out_m[unique] = out_m[j];
      ++unique;
    }
    a.n_out[c] = unique;
    a.nonfinite[c] = nonfinite;
    a.out_of_range[c] = out_of_range;
    a.nonpositive_err[c] = nonpositive;
    a.duplicate_time[c] = kept - unique;
    a.resorted[c] = decreasing ? 1 : 0;
    a.windows_per_curve[c] = window_count(unique, a.window, a.min_obs, a.mode);
    total_windows += a.windows_per_curve[c];
  }
  return total_windows;
}

void host_windows(const HostWindowArgs& a) {
  if (a.n_curves < 0 || a.window < 1 || a.n_windows < 0 || (a.mode != 0 && a.mode != 1))
    throw std::invalid_argument("host_windows: bad sizes, window or mode");
  if (a.scratch_offsets == nullptr || a.clean_time == nullptr || a.clean_mag == nullptr ||
      a.n_out == nullptr || a.windows_per_curve == nullptr || a.t == nullptr ||
      a.m == nullptr || a.valid == nullptr || a.curve == nullptr || a.n_valid == nullptr ||
      a.start == nullptr || a.order == nullptr)
    throw std::invalid_argument("host_windows: a buffer is missing");
  const std::int64_t W = a.window;

  // Sorted position of every window: a stable counting sort by decreasing valid count (the
  // numpy path's argsort(-n_valid, kind="stable")). first_at[v]: where count v begins.
  std::vector<std::int64_t> first_at(W + 2, 0);
  std::int64_t seen = 0;
  for (std::int64_t c = 0; c < a.n_curves; ++c) {
    const std::int64_t n = a.n_out[c];
    for (std::int64_t k = 0; k < a.windows_per_curve[c]; ++k) {
      const std::int64_t s = window_start(n, k, W, a.mode);
      ++first_at[std::min(n - s, W)];
      ++seen;
    }
  }
  if (seen != a.n_windows)
    throw std::invalid_argument("host_windows: n_windows differs from the curves' windows");
  std::int64_t pos = 0;
  for (std::int64_t v = W; v >= 1; --v) {
    const std::int64_t count = first_at[v];
    first_at[v] = pos;
    pos += count;
  }

  std::vector<double> row(W);
  std::int64_t index = 0;  // window index in curve order
  for (std::int64_t c = 0; c < a.n_curves; ++c) {
    const std::int64_t n = a.n_out[c];
    for (std::int64_t k = 0; k < a.windows_per_curve[c]; ++k, ++index) {
      const std::int64_t s = window_start(n, k, W, a.mode);
      const std::int64_t cnt = std::min(n - s, W);
      const std::int64_t dest = first_at[cnt]++;
      a.order[dest] = index;
      a.curve[dest] = c;
      a.n_valid[dest] = static_cast<std::int32_t>(cnt);
      a.start[dest] = s;
      const double* time = a.clean_time + a.scratch_offsets[c] + s;
      const float* mag = a.clean_mag + a.scratch_offsets[c] + s;
      float* t_row = a.t + dest * W;
      float* m_row = a.m + dest * W;
      std::uint8_t* valid_row = a.valid + dest * W;
      const double count = static_cast<double>(cnt);

      // Time: relative to the window's first observation (small numbers in the sum), centred,
      // and only then cast to float32. The sum runs over the padded row, as numpy's does.
      const double t0 = time[0];
      for (std::int64_t i = 0; i < cnt; ++i) row[i] = time[i] - t0;
      std::fill(row.begin() + cnt, row.end(), 0.0);
      const double rel_mean = (0.0 + pairwise_sum(row.data(), W)) / count;
      for (std::int64_t i = 0; i < cnt; ++i) t_row[i] = static_cast<float>(row[i] - rel_mean);

      for (std::int64_t i = 0; i < cnt; ++i) row[i] = static_cast<double>(mag[i]);
      const double mag_mean = (0.0 + pairwise_sum(row.data(), W)) / count;
      for (std::int64_t i = 0; i < cnt; ++i) m_row[i] = static_cast<float>(row[i] - mag_mean);

      std::fill(t_row + cnt, t_row + W, 0.0f);
      std::fill(m_row + cnt, m_row + W, 0.0f);
      std::fill(valid_row, valid_row + cnt, std::uint8_t{1});
      std::fill(valid_row + cnt, valid_row + W, std::uint8_t{0});
    }
  }
}

}  // namespace cpu
}  // namespace astromer_fast
