// Fused weighted masked RMSE of Astromer (SPEC.md section 4), CPU version.
//
//   inv_bl  = 1 / max(e_bl, 1e-8)
//   w_bl    = valid_bl * (flat_b ? 1 : (inv_bl - lo_b) / (hi_b - lo_b) + 1e-3)   (w = valid without e)
//             lo_b / hi_b = min / max of inv over the window's valid observations, flat_b = hi_b <= lo_b
//   c_b     = sum_l p_bl,    mse_b = sum_l w_bl p_bl (y_bl - yhat_bl)^2 / c_b    (windows with c_b > 0)
//   loss    = sqrt(mean_{b: c_b > 0} mse_b + 1e-12),  0 when no window has a probed observation
//
// For the backward it also writes dir_bl = w_bl p_bl (yhat_bl - y_bl) / c_b (0 where c_b == 0) and
// scale = 1 / (loss * n_windows_with_probed) (0 when there is none), so that
// d loss / d yhat = dir * scale.
//
// Deterministic: each window is reduced by one thread in a fixed order into a per-window partial,
// and the partials are summed in window order on the calling thread, so the result does not depend
// on the number of threads. Plain C++: no Python, no torch; dense row-major (rows, length) arrays.
#pragma once

#include <cstdint>

namespace astromer_fast {
namespace cpu {

struct WeightedRmseArgs {
  const void* pred = nullptr;            // [rows, length], float32 or bfloat16 (pred_bf16)
  bool pred_bf16 = false;
  const float* target = nullptr;         // [rows, length]
  const float* err = nullptr;            // [rows, length] or null (all weights 1 on valid)
  const std::uint8_t* probed = nullptr;  // [rows, length] (torch.bool storage: 0 / 1)
  const std::uint8_t* valid = nullptr;   // [rows, length], or null = probed
  std::int64_t rows = 0;
  std::int64_t length = 0;
  float* loss = nullptr;                 // [1]
  float* scale = nullptr;                // [1], or null
  float* dir = nullptr;                  // [rows, length], or null (no backward wanted)
};

// Throws std::invalid_argument on bad arguments. num_threads <= 1 runs on the calling thread.
void weighted_rmse_forward(const WeightedRmseArgs& args, int num_threads);

// The backward: grad[i] = dir[i] * (grad_loss * scale), the factor rounded to float32 first and
// the product rounded once to grad's dtype (float32, or bfloat16 round-to-nearest-even when
// grad_bf16), i.e. the same bits as torch's `(dir * (grad_loss * scale)).to(dtype)`. Elementwise,
// so any thread count gives the same result. n elements, dense.
void weighted_rmse_backward(const float* dir, float grad_loss, float scale, void* grad,
                            bool grad_bf16, std::int64_t n, int num_threads);

}  // namespace cpu
}  // namespace astromer_fast
