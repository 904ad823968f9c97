// Runs the scalar masked-attention kernels of csrc/cuda/masked_attention_kernels.cuh on the CPU
// through emu_cuda.h, with the launch geometry of masked_attention.cu (launch_forward,
// launch_backward). q/k/v/out/dout/dq/dk/dv are float32 (bf16 = 0) or bf16 bit patterns as
// uint16 (bf16 = 1); key_hidden uint8; lse and delta float32. Built and loaded by
// python_tests/test_cuda_emulated.py (ctypes). Each function returns nullptr or an error.
#include "emu_cuda.h"

#include "cuda/masked_attention_kernels.cuh"

namespace k = astromer_fast::cuda;

namespace {

template <class T>
const char* forward(const void* q, const void* kk, const void* v, const std::uint8_t* kh, int B,
                    int H, int L, int rule, float scale, void* out, float* lse) {
  const int tiles = (L + k::kRows - 1) / k::kRows;
  const long long blocks = static_cast<long long>(B) * H * tiles;
  return emu::launch(static_cast<unsigned>(blocks), k::kThreads, 0, k::attn_fwd_kernel<T>,
                     static_cast<const T*>(q), static_cast<const T*>(kk),
                     static_cast<const T*>(v), kh, H, L, tiles, rule, scale,
                     static_cast<T*>(out), lse);
}

template <class T>
const char* backward(const void* q, const void* kk, const void* v, const std::uint8_t* kh, int B,
                     int H, int L, int rule, float scale, const void* out, const float* lse,
                     const void* dout, float* delta, void* dq, void* dk, void* dv) {
  const int tiles = (L + k::kRows - 1) / k::kRows;
  const long long blocks = static_cast<long long>(B) * H * tiles;
  const long long rows = static_cast<long long>(B) * H * L;
  const int warps_per_block = 8;
  const long long dblocks = (rows + warps_per_block - 1) / warps_per_block;
  const T* qt = static_cast<const T*>(q);
  const T* kt = static_cast<const T*>(kk);
  const T* vt = static_cast<const T*>(v);
  const T* dot = static_cast<const T*>(dout);
  if (const char* e = emu::launch(static_cast<unsigned>(dblocks), 32 * warps_per_block, 0,
                                  k::attn_delta_kernel<T>, static_cast<const T*>(out), dot, rows,
                                  delta))
    return e;
  if (const char* e = emu::launch(static_cast<unsigned>(blocks), k::kThreads, 0,
                                  k::attn_bwd_dkdv_kernel<T>, qt, kt, vt, kh, dot, lse,
                                  static_cast<const float*>(delta), H, L, tiles, rule, scale,
                                  static_cast<T*>(dk), static_cast<T*>(dv)))
    return e;
  return emu::launch(static_cast<unsigned>(blocks), k::kThreads, 0, k::attn_bwd_dq_kernel<T>, qt,
                     kt, vt, kh, dot, lse, static_cast<const float*>(delta), H, L, tiles, rule,
                     scale, static_cast<T*>(dq));
}

}  // namespace

extern "C" {

const char* attn_emu_forward(int bf16, const void* q, const void* k, const void* v,
                             const std::uint8_t* kh, int B, int H, int L, int rule, float scale,
                             void* out, float* lse) {
  if (L < 1) return "L must be >= 1";
  return bf16 ? forward<__nv_bfloat16>(q, k, v, kh, B, H, L, rule, scale, out, lse)
              : forward<float>(q, k, v, kh, B, H, L, rule, scale, out, lse);
}

const char* attn_emu_backward(int bf16, const void* q, const void* k, const void* v,
                              const std::uint8_t* kh, int B, int H, int L, int rule, float scale,
                              const void* out, const float* lse, const void* dout, float* delta,
                              void* dq, void* dk, void* dv) {
  if (L < 1) return "L must be >= 1";
  return bf16 ? backward<__nv_bfloat16>(q, k, v, kh, B, H, L, rule, scale, out, lse, dout, delta,
                                        dq, dk, dv)
              : backward<float>(q, k, v, kh, B, H, L, rule, scale, out, lse, dout, delta, dq, dk,
                                dv);
}

}  // extern "C"
