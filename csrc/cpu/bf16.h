// bfloat16 <-> float32 on bit patterns, rounding as torch rounds (to nearest even; NaN stays a
// quiet NaN). Always inlined, so that target clones of their callers keep them inline.
#pragma once

#include <cstdint>
#include <cstring>

namespace astromer_fast {
namespace cpu {

inline __attribute__((always_inline)) std::uint16_t float_to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

inline __attribute__((always_inline)) float bf16_to_float(std::uint16_t h) {
  const std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace cpu
}  // namespace astromer_fast
