// Masked attention, CUDA host code: argument checks, launch geometry and the choice between the
// scalar kernels (masked_attention_kernels.cuh: flash-style forward with online softmax, backward
// by dk/dv and dq kernels that recompute P from lse; no atomics, deterministic) and the
// tensor-core ones (masked_attention_tc.cu).
//
// The scalar kernels compute in fp32 FMA, far slower than PyTorch's fused SDPA (bench/RESULTS.md),
// so the model's attention on CUDA defaults to "sdpa" (backends.CUDA_DEFAULTS); force
// backend="cuda" to use these. On the CPU, python_tests/test_cuda_emulated.py
// runs the kernels through the emulation of python_tests/cuda_emulation/emu_cuda.h at L = 1, 7,
// 16, 33, 200, 256 (fp32 and bf16, both rules), which checks their logic but not the hardware.
#include "cuda/masked_attention.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "cuda/common.cuh"
#include "cuda/masked_attention_kernels.cuh"

namespace astromer_fast {
namespace cuda {
namespace {

using detail::DeviceGuard;

const char* check(const MaskedAttentionArgs& a) {
  if (a.batch < 0 || a.heads < 0 || a.length < 0) return "masked_attention: negative size";
  if (a.head_dim != kHD) return "masked_attention: the CUDA kernels support head_dim 64 only";
  if (a.rule != 0 && a.rule != 1) return "masked_attention: unknown mask rule";
  if (a.length > (1 << 24)) return "masked_attention: length too large";
  const long long tiles = a.batch * a.heads * ((a.length + kRows - 1) / kRows);
  if (tiles > 0x7fffffffLL) return "masked_attention: too many (batch, head, row tile) blocks";
  return nullptr;
}

template <class T>
const char* launch_forward(const MaskedAttentionArgs& a, cudaStream_t stream) {
  const int L = static_cast<int>(a.length);
  const int tiles = (L + kRows - 1) / kRows;
  const long long blocks = a.batch * a.heads * tiles;
  attn_fwd_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(a.q), static_cast<const T*>(a.k), static_cast<const T*>(a.v),
      a.key_hidden, static_cast<int>(a.heads), L, tiles, a.rule, a.scale,
      static_cast<T*>(a.out), a.lse);
  return detail::launch_error("masked_attention attn_fwd_kernel");
}

template <class T>
const char* launch_backward(const MaskedAttentionBackwardArgs& g, cudaStream_t stream) {
  const MaskedAttentionArgs& a = g.fwd;
  const int L = static_cast<int>(a.length);
  const int tiles = (L + kRows - 1) / kRows;
  const long long blocks = a.batch * a.heads * tiles;
  const long long rows = a.batch * a.heads * a.length;
  const int warps_per_block = 8;
  const long long dblocks = (rows + warps_per_block - 1) / warps_per_block;
  attn_delta_kernel<T><<<static_cast<unsigned>(dblocks), 32 * warps_per_block, 0, stream>>>(
      static_cast<const T*>(a.out), static_cast<const T*>(g.dout), rows, g.delta);
  if (const char* e = detail::launch_error("masked_attention attn_delta_kernel")) return e;
  attn_bwd_dkdv_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(a.q), static_cast<const T*>(a.k), static_cast<const T*>(a.v),
      a.key_hidden, static_cast<const T*>(g.dout), a.lse, g.delta, static_cast<int>(a.heads), L,
      tiles, a.rule, a.scale, static_cast<T*>(g.dk), static_cast<T*>(g.dv));
  if (const char* e = detail::launch_error("masked_attention attn_bwd_dkdv_kernel")) return e;
  attn_bwd_dq_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(a.q), static_cast<const T*>(a.k), static_cast<const T*>(a.v),
      a.key_hidden, static_cast<const T*>(g.dout), a.lse, g.delta, static_cast<int>(a.heads), L,
      tiles, a.rule, a.scale, static_cast<T*>(g.dq));
  return detail::launch_error("masked_attention attn_bwd_dq_kernel");
}

}  // namespace

const char* masked_attention_forward(const MaskedAttentionArgs& a, int device, void* stream) {
  if (const char* e = check(a)) return e;
  if (a.batch * a.heads * a.length == 0) return nullptr;
  if (!a.q || !a.k || !a.v || !a.key_hidden || !a.out || !a.lse)
    return "masked_attention: null data pointer";
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess)
    return detail::named_error("masked_attention: cudaSetDevice", guard.status());
  if (a.tensor_cores && masked_attention_tc_supported(a))
    return masked_attention_forward_tc(a, stream);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return a.bf16 ? launch_forward<__nv_bfloat16>(a, s) : launch_forward<float>(a, s);
}

const char* masked_attention_backward(const MaskedAttentionBackwardArgs& g, int device,
                                      void* stream) {
  const MaskedAttentionArgs& a = g.fwd;
  if (const char* e = check(a)) return e;
  if (a.batch * a.heads * a.length == 0) return nullptr;
  if (!a.q || !a.k || !a.v || !a.key_hidden || !a.out || !a.lse || !g.dout || !g.dq || !g.dk ||
      !g.dv || !g.delta)
    return "masked_attention: null data pointer";
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess)
    return detail::named_error("masked_attention: cudaSetDevice", guard.status());
  if (a.tensor_cores && masked_attention_tc_supported(g))
    return masked_attention_backward_tc(g, stream);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return a.bf16 ? launch_backward<__nv_bfloat16>(g, s) : launch_backward<float>(g, s);
}

}  // namespace cuda
}  // namespace astromer_fast
