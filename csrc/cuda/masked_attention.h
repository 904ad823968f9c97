// Masked attention of Astromer (SPEC.md section 3), CUDA version. Same contract as
// cpu/masked_attention.h (mask terms, all-hidden rows, lse), with device pointers and float32 or
// bfloat16 q/k/v/out/dout/dq/dk/dv (float32 accumulation; lse and delta always float32).
// This header includes no CUDA header so that the host-compiled bindings need no CUDA include path.
//
// What has run on a GPU, and how fast, is in bench/RESULTS.md. All lengths up to 256 are checked
// on the CPU by python_tests/test_cuda_emulated.py (scalar kernels) and
// python_tests/test_attention_tensor_cores.py (tensor-core kernels) through the CUDA emulation of
// python_tests/cuda_emulation/emu_cuda.h.
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
  // Ask for the tensor-core kernels (masked_attention_tc.cu; bf16 only, L <= 256, sm_80+ with
  // enough shared memory, 16-byte aligned tensors); otherwise, or when unsupported, the scalar
  // kernels run. Off by default: the tensor-core kernels have NOT YET RUN ON A GPU.
  bool tensor_cores = false;
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

// Tensor-core path (masked_attention_tc.cu), used by the two functions above when
// args.tensor_cores is set and *_supported() holds (it queries the current device, which the
// caller has set to `device`).
bool masked_attention_tc_supported(const MaskedAttentionArgs& args);
bool masked_attention_tc_supported(const MaskedAttentionBackwardArgs& args);
const char* masked_attention_forward_tc(const MaskedAttentionArgs& args, void* stream);
const char* masked_attention_backward_tc(const MaskedAttentionBackwardArgs& args, void* stream);

}  // namespace cuda
}  // namespace astromer_fast
