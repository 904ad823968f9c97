// Which vector instructions the CPU kernels of the fused encoder block use, chosen at run time.
//
// One wheel must serve every x86-64 CPU, so these kernels are compiled several times (baseline
// SSE2, x86-64-v3 = AVX2+FMA, x86-64-v4 = AVX-512, and AVX-512 with the BF16 dot products) and the
// best level the CPU and the OS support is picked when they are first called. The level can be
// lowered (never raised) with set_isa_limit, so every level can be tested on one machine. Other
// architectures have the baseline only.
#pragma once

#include <string>

namespace astromer_fast {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

struct CpuFeatures {
  std::string model;     // the CPU's brand string ("" when unknown)
  bool avx2_fma = false;  // x86-64-v3
  bool avx512 = false;    // F, BW, VL, DQ, CD: x86-64-v4
  bool avx512_bf16 = false;
  bool avx512_vnni = false;
  bool amx_bf16 = false;  // reported only: oneDNN's GEMMs use it, our kernels do not
};

const CpuFeatures& cpu_features();
Isa detected_isa();
// The level the kernels run at: the detected one, or lower after set_isa_limit.
Isa active_isa();
// Caps the level; throws std::invalid_argument when `limit` is above what the CPU supports.
void set_isa_limit(Isa limit);
const char* isa_name(Isa isa);
// The Isa named by isa_name (throws std::invalid_argument for another name).
Isa isa_from_name(const std::string& name);

}  // namespace cpu
}  // namespace astromer_fast
