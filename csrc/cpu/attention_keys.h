// Which keys an attention row runs over, and the additive mask terms of the two rules; shared by
// the attention kernels (cpu/masked_attention.cpp, cpu/fused_block.cpp).
#pragma once

#include <cstdint>
#include <limits>

#include "cpu/masked_attention.h"
#include "cpu/vec.h"

namespace astromer_fast {
namespace cpu {

// The keys a window's softmax runs over, in order: pos[j] is the position of the j-th one.
// Rule "key": a hidden key's logit is s - 1e9, whose exponential underflows to exactly 0 beside
// any visible key, so only the visible keys are kept: the same non-zero terms in the same order
// (only the grouping of the float sums changes), and attention costs what the visible keys cost
// (padding, and the MASK-token observations of pretraining). Every key is kept when all are
// hidden (the row is then a uniform average) and under rule query_or_key_plus1 (+1 hides nothing).
struct KeySet {
  std::int64_t n = 0, np = 0;           // kept keys; n rounded up to the vector width
  const std::int64_t* pos = nullptr;    // [n] their positions
  const std::uint8_t* hidden = nullptr;  // [n] their hidden flags
  bool all = true;                      // every key kept (pos[j] == j)
};

inline KeySet key_set(const std::uint8_t* hid, std::int64_t L, int rule, std::int64_t* pos,
                      std::uint8_t* hidden) {
  KeySet ks;
  ks.pos = pos;
  ks.hidden = hidden;
  if (rule == kRuleKey)
    for (std::int64_t j = 0; j < L; ++j)
      if (hid[j] == 0) {
        pos[ks.n] = j;
        hidden[ks.n++] = 0;
      }
  if (ks.n == 0 || ks.n == L) {  // nothing to leave out
    for (std::int64_t j = 0; j < L; ++j) {
      pos[j] = j;
      hidden[j] = hid[j];
    }
    ks.n = L;
  }
  ks.all = ks.n == L;
  ks.np = round_up(ks.n, W);
  return ks;
}

// Per-key additive terms so that s' = (s + b1[j]) + b2[j] reproduces the reference in float32
// (see the header) for the L keys given (a KeySet's); columns L .. Lp-1 get -inf, i.e.
// probability 0. For rule
// query_or_key_plus1, b1q is the row used by hidden queries (+1 on every real key).
inline void key_terms(const std::uint8_t* hid, std::int64_t L, std::int64_t Lp, int rule,
                      float* b1, float* b2, float* b1q) {
  bool all_hidden = true;
  for (std::int64_t j = 0; j < L; ++j) all_hidden = all_hidden && hid[j] != 0;
  const float ninf = -std::numeric_limits<float>::infinity();
  for (std::int64_t j = 0; j < Lp; ++j) {
    const bool h = j < L && hid[j] != 0;
    if (j >= L) {
      b1[j] = ninf;
      b2[j] = 0.0f;
      b1q[j] = ninf;
    } else if (rule == kRuleKey) {
      b1[j] = h ? -1e9f : 0.0f;
      b2[j] = (h && all_hidden) ? 1e9f : 0.0f;
      b1q[j] = b1[j];
    } else {
      b1[j] = h ? 1.0f : 0.0f;
      b2[j] = 0.0f;
      b1q[j] = 1.0f;
    }
  }
}

// x[r*ld + j] = scaled logits with the mask terms; returns the row maximum.
AF_INLINE float biased_row(float* __restrict__ s, const float* __restrict__ b1,
                           const float* __restrict__ b2, std::int64_t Lp, float scale) {
  vf m = splat(-std::numeric_limits<float>::infinity());
  for (std::int64_t j = 0; j < Lp; j += W) {
    const vf x = (loadv(s + j) * scale + loadv(b1 + j)) + loadv(b2 + j);
    storev(s + j, x);
    m = x > m ? x : m;
  }
  return reduce_max(m);  // a maximum is the same in any order
}

}  // namespace cpu
}  // namespace astromer_fast
