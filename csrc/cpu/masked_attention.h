// Masked multi-head attention of Astromer (SPEC.md section 3), CPU version, float32.
//
//   s[i, j]  = scale * q[i] . k[j]
//   s'[i, j] = rule "key" (Astromer 2):  s + (-1e9) where key j is hidden, in float32 exactly as the
//              reference adds it. If *every* key of the window is hidden, the reference's logits are
//              all fl(s - 1e9) = -1e9 (for |s| < 32) and the row is a uniform average; we keep those
//              logits shifted back by +1e9 (fl(fl(s - 1e9) + 1e9), exact), which changes no softmax
//              but keeps the log-sum-exp small enough to recompute P from it in the backward.
//              rule "query_or_key_plus1" (Astromer 1): s + 1 where query i or key j is hidden.
//   out[i]   = sum_j softmax_j(s'[i, :]) v[j],   lse[i] = log sum_j exp(s'[i, j])
//
// Backward (flash style): P = exp(s' - lse), D_i = dO_i . out_i, dS = P (dO V^T - D),
//   dq = scale dS K, dk = scale dS^T Q, dv = P^T dO.
//
// Plain C++: no Python, no torch. Arrays are row-major (B, H, L, hd) and (B, L), dense except q, k
// and v, whose batch, head and row strides may be given (rows themselves contiguous): the model's
// heads are then read straight out of its (B, L, H*hd) projections, without a transposing copy.
#pragma once

#include <cstdint>

namespace astromer_fast {
namespace cpu {

enum MaskRule : int { kRuleKey = 0, kRuleQueryOrKeyPlus1 = 1 };

struct MaskedAttentionArgs {
  const float* q = nullptr;                  // [B, H, L, hd]
  const float* k = nullptr;                  // [B, H, L, hd]
  const float* v = nullptr;                  // [B, H, L, hd]
  const std::uint8_t* key_hidden = nullptr;  // [B, L] (torch.bool storage: 0 / 1)
  std::int64_t batch = 0, heads = 0, length = 0, head_dim = 0;
  // Element strides of q, k, v over (batch, head, row); all zero = dense (H*L*hd, L*hd, hd).
  std::int64_t q_strides[3] = {0, 0, 0}, k_strides[3] = {0, 0, 0}, v_strides[3] = {0, 0, 0};
  int rule = kRuleKey;
  float scale = 0.125f;
  // forward outputs / backward inputs
  float* out = nullptr;  // [B, H, L, hd]
  float* lse = nullptr;  // [B, H, L]
};

struct MaskedAttentionBackwardArgs {
  MaskedAttentionArgs fwd;       // q, k, v, key_hidden, shapes, rule, scale; out, lse as inputs
  const float* dout = nullptr;   // [B, H, L, hd]
  float* dq = nullptr;           // [B, H, L, hd]
  float* dk = nullptr;           // [B, H, L, hd]
  float* dv = nullptr;           // [B, H, L, hd]
};

// Throw std::invalid_argument on bad arguments (head_dim must be a positive multiple of 16).
// num_threads <= 1 runs on the calling thread. Results do not depend on num_threads.
void masked_attention_forward(const MaskedAttentionArgs& args, int num_threads);
void masked_attention_backward(const MaskedAttentionBackwardArgs& args, int num_threads);

}  // namespace cpu
}  // namespace astromer_fast
