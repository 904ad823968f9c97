// Runs the tensor-core attention kernels of csrc/cuda/masked_attention_tc.cuh on the CPU through
// emu_cuda.h, with the same launch geometry as masked_attention_tc.cu. Host arrays: bf16 as
// uint16 bit patterns, key_hidden as uint8, lse/delta float32. Built and loaded by
// python_tests/test_attention_tensor_cores.py (ctypes). Each function returns nullptr or an error.
#include "emu_cuda.h"

#include "cuda/masked_attention_tc.cuh"

namespace tc = astromer_fast::cuda::tc;

namespace {

// nsplit <= 0: what the GPU host code would choose on a GPU with `sms` multiprocessors.
int pick_nsplit(long long bh, int L, int warps, int nsplit, int sms) {
  if (nsplit > 0) {
    const int max_split = (tc::padded_length(L) / 16 + warps - 1) / warps;
    return nsplit < max_split ? nsplit : max_split;
  }
  return tc::choose_nsplit(bh, L, warps, 4LL * sms);
}

tc::Params params(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v,
                  const std::uint8_t* kh, int B, int H, int L, int rule, float scale) {
  tc::Params p{};
  p.q = reinterpret_cast<const __nv_bfloat16*>(q);
  p.k = reinterpret_cast<const __nv_bfloat16*>(k);
  p.v = reinterpret_cast<const __nv_bfloat16*>(v);
  p.key_hidden = kh;
  p.heads = H;
  p.length = L;
  p.rule = rule;
  p.scale = scale;
  p.rows = static_cast<long long>(B) * H * L;
  return p;
}

}  // namespace

extern "C" {

const char* tc_emu_forward(const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* v,
                           const std::uint8_t* kh, int B, int H, int L, int rule, float scale,
                           int nsplit, int sms, std::uint16_t* out, float* lse) {
  if (L < 1 || L > tc::kMaxL) return "L out of range";
  tc::Params p = params(q, k, v, kh, B, H, L, rule, scale);
  p.out_w = reinterpret_cast<__nv_bfloat16*>(out);
  p.lse = lse;
  const long long bh = static_cast<long long>(B) * H;
  p.nsplit = pick_nsplit(bh, L, tc::kFwdWarps, nsplit, sms);
  return emu::launch(static_cast<unsigned>(bh * p.nsplit), tc::kFwdWarps * 32,
                     tc::fwd_layout(L).bytes, tc::attn_tc_fwd_kernel, p);
}

const char* tc_emu_backward(const std::uint16_t* q, const std::uint16_t* k,
                            const std::uint16_t* v, const std::uint8_t* kh, int B, int H, int L,
                            int rule, float scale, int nsplit, int sms, const std::uint16_t* out,
                            const float* lse, const std::uint16_t* dout, float* delta,
                            std::uint16_t* dq, std::uint16_t* dk, std::uint16_t* dv) {
  if (L < 1 || L > tc::kMaxL) return "L out of range";
  tc::Params p = params(q, k, v, kh, B, H, L, rule, scale);
  p.out = reinterpret_cast<const __nv_bfloat16*>(out);
  p.lse_in = lse;
  p.dout = reinterpret_cast<const __nv_bfloat16*>(dout);
  p.delta = delta;
  p.dq = reinterpret_cast<__nv_bfloat16*>(dq);
  p.dk = reinterpret_cast<__nv_bfloat16*>(dk);
  p.dv = reinterpret_cast<__nv_bfloat16*>(dv);
  const long long bh = static_cast<long long>(B) * H;
  p.nsplit = pick_nsplit(bh, L, tc::kBwdWarps, nsplit, sms);
  if (const char* e = emu::launch(static_cast<unsigned>((p.rows + 31) / 32), 256, 0,
                                  tc::attn_tc_delta_kernel, p))
    return e;
  if (const char* e = emu::launch(static_cast<unsigned>(bh * p.nsplit), tc::kBwdWarps * 32,
                                  tc::bwd_layout(L, true).bytes, tc::attn_tc_dkdv_kernel, p))
    return e;
  return emu::launch(static_cast<unsigned>(bh * p.nsplit), tc::kBwdWarps * 32,
                     tc::bwd_layout(L, false).bytes, tc::attn_tc_dq_kernel, p);
}

// Shared-memory bytes per CTA of the three kernels at length L (for the report / tests).
void tc_emu_smem_bytes(int L, unsigned* fwd, unsigned* dq, unsigned* dkdv) {
  *fwd = tc::fwd_layout(L).bytes;
  *dq = tc::bwd_layout(L, false).bytes;
  *dkdv = tc::bwd_layout(L, true).bytes;
}

}  // extern "C"
