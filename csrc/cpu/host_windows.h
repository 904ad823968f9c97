// The host side of embedding in one pass per batch: light curves read in place from Arrow
// buffers, cleaned, centred and windowed straight into the batch buffers the model reads.
//
// Two calls, because the number of windows is known only after cleaning:
//   host_clean:   read every curve's observations (float32 or float64, Arrow validity bitmaps:
//                 a null value is NaN, a null parent struct nulls its fields), drop the
//                 non-finite / out-of-range / non-positive-error observations, sort a curve by
//                 time where it is not sorted (stable), drop repeated times (first kept), and
//                 write the cleaned time (float64) and magnitude (float32) to a scratch buffer;
//                 counts what was dropped per curve and the windows each curve will get.
//   host_windows: cut the cleaned curves into windows, centre each on its valid observations
//                 (time in float64, relative to the window's first time) and write them padded
//                 and sorted by decreasing valid count (stable) into the caller's buffers.
//
// The rules and the arithmetic are those of astromer_fast/data/preprocess.py (basic_clean,
// make_windows) operation for operation, numpy's pairwise summation of a padded row included, so
// the outputs are bit-identical to the numpy path. Plain C++: no Python, no Arrow library; the
// caller keeps every buffer alive and owns all memory.
#pragma once

#include <cstdint>

namespace astromer_fast {
namespace cpu {

// One observation field (time, magnitude or error) in an Arrow array.
struct ObsColumn {
  const void* values = nullptr;               // null: the field is absent (errors only)
  bool is_f64 = false;                        // float64 values, else float32
  std::int64_t offset = 0;                    // the array's offset: physical = offset + logical
  const std::uint8_t* valid_bits = nullptr;   // validity bitmap (LSB first), null = all valid
  const std::uint8_t* parent_bits = nullptr;  // enclosing struct's validity bitmap, or null
  std::int64_t parent_offset = 0;             // that struct's offset
  const std::int64_t* starts = nullptr;       // per curve: logical index of its first value
};

struct HostCleanArgs {
  std::int64_t n_curves = 0;
  const std::int64_t* lengths = nullptr;  // observations per curve as read (0: null/bad row)
  ObsColumn time, mag, err;
  double time_limit = 1e7;                // |time| beyond: not a measurement
  double mag_limit = 1e3;
  std::int64_t window = 200;
  std::int64_t min_obs = 5;
  int mode = 0;                           // 0: overlap (official), 1: nonoverlap
  // Scratch, n_curves + 1 offsets (cumulative lengths) and that many observations.
  const std::int64_t* scratch_offsets = nullptr;
  double* clean_time = nullptr;
  float* clean_mag = nullptr;
  // Per curve outputs.
  std::int64_t* n_out = nullptr;
  std::int64_t* nonfinite = nullptr;
  std::int64_t* out_of_range = nullptr;
  std::int64_t* nonpositive_err = nullptr;
  std::int64_t* duplicate_time = nullptr;
  std::uint8_t* resorted = nullptr;
  std::int64_t* windows_per_curve = nullptr;
};

// Returns the total number of windows. Throws std::invalid_argument on bad arguments.
std::int64_t host_clean(const HostCleanArgs& args);

struct HostWindowArgs {
  std::int64_t n_curves = 0;
  std::int64_t window = 200;
  int mode = 0;
  const std::int64_t* scratch_offsets = nullptr;  // as given to host_clean, with its outputs:
  const double* clean_time = nullptr;
  const float* clean_mag = nullptr;
  const std::int64_t* n_out = nullptr;
  const std::int64_t* windows_per_curve = nullptr;
  std::int64_t n_windows = 0;                     // host_clean's result
  // Outputs, windows sorted by decreasing valid count (ties in curve order).
  float* t = nullptr;                 // [n_windows, window] centred time, 0 at padding
  float* m = nullptr;                 // [n_windows, window] centred magnitude, 0 at padding
  std::uint8_t* valid = nullptr;      // [n_windows, window] (torch.bool storage)
  std::int64_t* curve = nullptr;      // [n_windows] source curve
  std::int32_t* n_valid = nullptr;    // [n_windows]
  std::int64_t* start = nullptr;      // [n_windows] first observation within the cleaned curve
  std::int64_t* order = nullptr;      // [n_windows] the window's index in curve order
};

void host_windows(const HostWindowArgs& args);

}  // namespace cpu
}  // namespace astromer_fast
