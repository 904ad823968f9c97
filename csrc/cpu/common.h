// Plumbing shared by the CPU kernels.
#pragma once

// x86-64 wheels must run on any x86-64 CPU, so the baseline build is SSE2; hot functions get
// extra clones for wider ISAs, picked at load time through an ifunc. The clones name ISA levels
// (x86-64-v3 = AVX2+FMA, x86-64-v4 = AVX-512), not CPU models: "arch=haswell" would be chosen only
// on that exact Intel core and never on, e.g., AMD EPYC. Elsewhere (or with
// ASTROMER_FAST_NO_CLONES) there is just the portable version.
//   ASTROMER_FAST_CLONES:    x86-64-v3 and the baseline.
//   ASTROMER_FAST_CLONES_V4: x86-64-v4, x86-64-v3 and the baseline.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__) && !defined(ASTROMER_FAST_NO_CLONES)
#define ASTROMER_FAST_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define ASTROMER_FAST_CLONES_V4 \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ASTROMER_FAST_CLONES
#define ASTROMER_FAST_CLONES_V4
#endif
