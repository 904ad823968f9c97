#include "cpu/isa.h"

#include <atomic>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

namespace astromer_fast {
namespace cpu {
namespace {

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) && defined(__GNUC__)
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
  __builtin_cpu_init();
  f.avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  f.avx512 = f.avx2_fma && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512cd");
  f.avx512_bf16 = f.avx512 && __builtin_cpu_supports("avx512bf16");
  f.avx512_vnni = f.avx512 && __builtin_cpu_supports("avx512vnni");
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) f.amx_bf16 = (d >> 22) & 1u;
  unsigned brand[12] = {};
  if (__get_cpuid(0x80000000u, &a, &b, &c, &d) && a >= 0x80000004u) {
    for (unsigned i = 0; i < 3; ++i)
      __get_cpuid(0x80000002u + i, &brand[4 * i], &brand[4 * i + 1], &brand[4 * i + 2],
                  &brand[4 * i + 3]);
    char text[49] = {};
    std::memcpy(text, brand, 48);
    f.model = text;
    const auto first = f.model.find_first_not_of(' ');
    f.model = first == std::string::npos ? "" : f.model.substr(first);
  }
#endif
  return f;
}

std::atomic<int> g_limit{static_cast<int>(Isa::kAvx512Bf16)};

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

Isa detected_isa() {
  const CpuFeatures& f = cpu_features();
  if (f.avx512_bf16) return Isa::kAvx512Bf16;
  if (f.avx512) return Isa::kAvx512;
  if (f.avx2_fma) return Isa::kAvx2;
  return Isa::kBaseline;
}

Isa active_isa() {
  const int d = static_cast<int>(detected_isa());
  const int l = g_limit.load(std::memory_order_relaxed);
  return static_cast<Isa>(l < d ? l : d);
}

void set_isa_limit(Isa limit) {
  if (static_cast<int>(limit) > static_cast<int>(detected_isa()))
    throw std::invalid_argument(std::string("this CPU does not support ISA level '") +
                                isa_name(limit) + "' (best: '" + isa_name(detected_isa()) + "')");
  g_limit.store(static_cast<int>(limit), std::memory_order_relaxed);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

Isa isa_from_name(const std::string& name) {
  for (Isa i : {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16})
    if (name == isa_name(i)) return i;
  throw std::invalid_argument("unknown ISA level '" + name +
                              "'; choose one of baseline, avx2, avx512, avx512_bf16");
}

}  // namespace cpu
}  // namespace astromer_fast
