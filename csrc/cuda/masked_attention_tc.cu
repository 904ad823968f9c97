// Host side of the tensor-core masked attention (kernels in masked_attention_tc.cuh): support
// check, shared-memory opt-in, launch geometry. Chosen by masked_attention.cu for bf16 inputs when
// the caller asks for tensor cores (MaskedAttentionArgs::tensor_cores).
//
// NOT YET RUN ON A GPU: compiled with nvcc 13 on a machine without one; the kernels' logic is
// tested on the CPU through python_tests/cuda_emulation.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/masked_attention.h"
#include "cuda/masked_attention_tc.cuh"

namespace astromer_fast {
namespace cuda {
namespace {

bool aligned16(const void* ptr) { return (reinterpret_cast<std::uintptr_t>(ptr) & 15u) == 0; }

// CTAs wanted in all before (b, h) windows are split across CTAs: a few per SM.
constexpr long long kCtasPerSmTarget = 4;

struct DeviceInfo {
  cudaError_t status = cudaSuccess;
  int major = 0, sms = 0, smem_optin = 0;
};

DeviceInfo query_device() {
  DeviceInfo d;
  int dev = 0;
  if ((d.status = cudaGetDevice(&dev)) != cudaSuccess) return d;
  if ((d.status = cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev)) !=
      cudaSuccess)
    return d;
  if ((d.status = cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev)) !=
      cudaSuccess)
    return d;
  d.status = cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return d;
}

// The largest dynamic shared memory any of the kernels needs at this length.
unsigned tc_smem_bytes(int L) {
  const unsigned f = tc::fwd_layout(L).bytes;
  const unsigned a = tc::bwd_layout(L, false).bytes;
  const unsigned b = tc::bwd_layout(L, true).bytes;
  return f > a ? (f > b ? f : b) : (a > b ? a : b);
}

template <class Kernel>
const char* launch(Kernel kernel, const char* name, long long blocks, int threads, unsigned smem,
                   const tc::Params& p, cudaStream_t stream) {
  if (blocks > 0x7fffffffLL) return "masked_attention (tensor cores): too many blocks";
  // Above 48 KB a kernel must opt in (CUDA C++ Programming Guide, "Shared Memory").
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem));
  if (e != cudaSuccess) return detail::named_error(name, e);
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(p);
  return detail::launch_error(name);
}

tc::Params base_params(const MaskedAttentionArgs& a) {
  tc::Params p{};
  p.q = static_cast<const __nv_bfloat16*>(a.q);
  p.k = static_cast<const __nv_bfloat16*>(a.k);
  p.v = static_cast<const __nv_bfloat16*>(a.v);
  p.key_hidden = a.key_hidden;
  p.heads = static_cast<int>(a.heads);
  p.length = static_cast<int>(a.length);
  p.rule = a.rule;
  p.scale = a.scale;
  p.rows = a.batch * a.heads * a.length;
  return p;
}

}  // namespace

bool masked_attention_tc_supported(const MaskedAttentionArgs& a) {
  if (!a.bf16 || !a.tensor_cores || a.head_dim != tc::kHD || a.length < 1 ||
      a.length > tc::kMaxL)
    return false;
  if (!aligned16(a.q) || !aligned16(a.k) || !aligned16(a.v) || !aligned16(a.out)) return false;
  const DeviceInfo d = query_device();
  if (d.status != cudaSuccess) {
    cudaGetLastError();  // not ours to report: the scalar path reports its own errors
    return false;
  }
  return d.major >= 8 && tc_smem_bytes(static_cast<int>(a.length)) <=
                             static_cast<unsigned>(d.smem_optin);
}

bool masked_attention_tc_supported(const MaskedAttentionBackwardArgs& g) {
  return masked_attention_tc_supported(g.fwd) && aligned16(g.dout) && aligned16(g.dq) &&
         aligned16(g.dk) && aligned16(g.dv);
}

const char* masked_attention_forward_tc(const MaskedAttentionArgs& a, void* stream_) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  const DeviceInfo d = query_device();
  if (d.status != cudaSuccess) return detail::named_error("masked_attention (tc)", d.status);
  const long long bh = a.batch * a.heads;
  const int L = static_cast<int>(a.length);
  tc::Params p = base_params(a);
  p.out_w = static_cast<__nv_bfloat16*>(a.out);
  p.lse = a.lse;
  p.nsplit = tc::choose_nsplit(bh, L, tc::kFwdWarps, kCtasPerSmTarget * d.sms);
  return launch(tc::attn_tc_fwd_kernel, "masked_attention attn_tc_fwd_kernel", bh * p.nsplit,
                tc::kFwdWarps * 32, tc::fwd_layout(L).bytes, p, stream);
}

const char* masked_attention_backward_tc(const MaskedAttentionBackwardArgs& g, void* stream_) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  const MaskedAttentionArgs& a = g.fwd;
  const DeviceInfo d = query_device();
  if (d.status != cudaSuccess) return detail::named_error("masked_attention (tc)", d.status);
  const long long bh = a.batch * a.heads;
  const int L = static_cast<int>(a.length);
  tc::Params p = base_params(a);
  p.out = static_cast<const __nv_bfloat16*>(a.out);
  p.lse_in = a.lse;
  p.dout = static_cast<const __nv_bfloat16*>(g.dout);
  p.delta = g.delta;
  p.dq = static_cast<__nv_bfloat16*>(g.dq);
  p.dk = static_cast<__nv_bfloat16*>(g.dk);
  p.dv = static_cast<__nv_bfloat16*>(g.dv);
  p.nsplit = tc::choose_nsplit(bh, L, tc::kBwdWarps, kCtasPerSmTarget * d.sms);

  const long long delta_blocks = (p.rows + 31) / 32;  // 8 lanes per row, 256 threads
  if (delta_blocks > 0x7fffffffLL) return "masked_attention (tensor cores): too many rows";
  tc::attn_tc_delta_kernel<<<static_cast<unsigned>(delta_blocks), 256, 0, stream>>>(p);
  if (const char* e = detail::launch_error("masked_attention attn_tc_delta_kernel")) return e;
  if (const char* e = launch(tc::attn_tc_dkdv_kernel, "masked_attention attn_tc_dkdv_kernel",
                             bh * p.nsplit, tc::kBwdWarps * 32, tc::bwd_layout(L, true).bytes, p,
                             stream))
    return e;
  return launch(tc::attn_tc_dq_kernel, "masked_attention attn_tc_dq_kernel", bh * p.nsplit,
                tc::kBwdWarps * 32, tc::bwd_layout(L, false).bytes, p, stream);
}

}  // namespace cuda
}  // namespace astromer_fast
