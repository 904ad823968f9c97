// Masked attention of Astromer (SPEC.md section 3), CUDA version. Same contract as
// cpu/masked_attention.h (mask terms, all-hidden rows, lse), with device pointers and float32 or
// bfloat16 q/k/v/out/dout/dq/dk/dv (float32 accumulation; lse and delta always float32).
// This header includes no CUDA header so that the host-compiled bindings need no CUDA include path.
//
// NOT YET RUN ON A GPU: written and compiled (nvcc 13) on a machine without one.
#pragma once

#include <cstdint>

namespace astromer_fast {
namespace cuda {

struct MaskedAttentionArgs {
  const void* q = nullptr;                   // [B, H, L, hd], float32 or bfloat16 (see bf16)
  const void* k = nullptr;
  const void* v = nullptr;
  const std::uint8_t* key_hidden = nullptr;  // [B, L]
  bool bf16 = false;
  std::int64_t batch = 0, heads = 0, length = 0, head_dim = 0;  // head_dim must be 64
  int rule = 0;                              // 0: key (-1e9), 1: query_or_key_plus1 (+1)
  float scale = 0.125f;
  void* out = nullptr;                       // [B, H, L, hd] (forward output / backward input)
  float* lse = nullptr;                      // [B, H, L]
};

struct MaskedAttentionBackwardArgs {
  MaskedAttentionArgs fwd;
  const void* dout = nullptr;  // [B, H, L, hd]
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* delta = nullptr;      // [B, H, L] float32 workspace (rowsum(dout * out))
};

// Enqueue on `stream` (a cudaStream_t) on `device`; nullptr on success, else a static message.
const char* masked_attention_forward(const MaskedAttentionArgs& args, int device, void* stream);
const char* masked_attention_backward(const MaskedAttentionBackwardArgs& args, int device,
                                      void* stream);

}  // namespace cuda
}  // namespace astromer_fast
