// Static shared arrays for kernels that the CPU emulation (python_tests/cuda_emulation) also runs:
// plain __shared__ on the GPU (the declarations nvcc always compiled); the emulation, which has no
// per-block storage class, defines the macro first and allocates them per block instead
// (NaN-filled, with guards, checked against the 48 KB static limit).
#pragma once

#ifndef ASTROMER_FAST_SHARED_ARRAY
#define ASTROMER_FAST_SHARED_ARRAY(T, name, n) __shared__ T name[n]
#endif
