// The non-GEMM parts of an Astromer encoder block on the CPU, fused, for float32 or bfloat16
// activations. With the GEMMs left to the caller (oneDNN through torch), a block is
//
//   Y  = X [Wq; Wk; Wv; Wleak1]^T          (one GEMM; no biases: they are added below)
//   O  = block_attention(Y)                 q, k, v read out of Y by strides, + their biases
//   Z  = O Wo^T;          A = residual_layernorm(Z + bo, Y[:, 3d:] + bleak1)      (LN1)
//   U  = A [Wffn1; Wleak2]^T;  H = bias_tanh(U[:, :dff] + bffn1)
//   F  = H Wffn2^T;       X' = residual_layernorm(F + bffn2, U[:, dff:] + bleak2)  (LN2)
//
// and the window means of X' (the embedding) come out of the last residual_layernorm. For training,
// the passes also apply dropout (a counter-based hash of (seed, row, column), so the backward
// regenerates the mask instead of storing it), keep what their backward needs (LayerNorm's
// normalised input and 1/std, the attention's log-sum-exp), and each has a backward pass that also
// sums the bias and LayerNorm-affine gradients over rows. Each pass
// reads and writes its rows once; arithmetic is float32 whatever the storage, and bfloat16 results
// are rounded to nearest even, as torch rounds them.
//
// Plain C++: raw pointers, no Python, no torch. Rows are r = b * length + i; every matrix is
// row-major with its own leading dimension (elements between rows).
#pragma once

#include <cstdint>

namespace astromer_fast {
namespace cpu {

enum class Storage : int { kFloat32 = 0, kBFloat16 = 1 };

struct BlockAttentionArgs {
  const void* qkv = nullptr;  // [B*L, >= 3*H*hd]: q at column 0, k at H*hd, v at 2*H*hd
  std::int64_t ld_qkv = 0;
  const float* bias = nullptr;  // [3*H*hd] added to q, k, v; null = none
  const std::uint8_t* hidden = nullptr;  // [B, L]
  std::int64_t batch = 0, length = 0, heads = 0, head_dim = 0;
  float* lse = nullptr;  // [B, H, L] log-sum-exp of each row's logits (training), or null
  int rule = 0;  // MaskRule of cpu/masked_attention.h
  float scale = 0.125f;
  // Rule "key" only: rows of hidden queries are written as zeros instead of computed. Exact for
  // embeddings, where hidden means padding: no visible row ever reads them.
  bool skip_hidden_queries = false;
  Storage storage = Storage::kFloat32;  // of qkv and out
  void* out = nullptr;  // [B*L, >= H*hd], heads side by side (head h at columns h*hd ..)
  std::int64_t ld_out = 0;
  // Packed windows instead (rule "key", inference): window b is rows row_offsets[b] ..
  // row_offsets[b + 1] - 1, every one visible, `length` the longest; hidden is not read. No
  // padding row is then stored, projected or attended to.
  const std::int64_t* row_offsets = nullptr;  // [B + 1]
};

struct ResidualLayerNormArgs {
  const void* x = nullptr;  // [rows, dim] the branch
  std::int64_t ld_x = 0;
  const float* bias_x = nullptr;  // [dim] or null
  const void* res = nullptr;  // [rows, dim] the skip path, or null
  std::int64_t ld_res = 0;
  const float* bias_res = nullptr;  // [dim] or null
  const float* gamma = nullptr;  // [dim]
  const float* beta = nullptr;   // [dim]
  float eps = 1e-6f;
  std::int64_t rows = 0, dim = 0;
  Storage storage = Storage::kFloat32;  // of x, res and out
  void* out = nullptr;  // [rows, dim]; may be x or res
  std::int64_t ld_out = 0;
  // Optional window means of the (float32, unrounded) output over valid rows: rows form windows of
  // window_rows (or, packed, window w is rows row_offsets[w] .. row_offsets[w + 1] - 1, all valid);
  // pooled[w * ld_pooled + c] = sum of valid rows / max(1, valid rows).
  const std::uint8_t* valid = nullptr;  // [rows]
  std::int64_t window_rows = 0;
  const std::int64_t* row_offsets = nullptr;  // [windows + 1]
  std::int64_t windows = 0;
  float* pooled = nullptr;
  std::int64_t ld_pooled = 0;
  // Training: dropout on the branch, (x + bias_x) * keep(seed, r, c) / dropout_keep (1 = none),
  // and what the backward needs: xhat [rows, dim] (normalised input) and rstd [rows], or null.
  float dropout_keep = 1.0f;
  std::uint64_t dropout_seed = 0;
  float* xhat = nullptr;
  float* rstd = nullptr;
};

// Rows per block of the partial column sums that the backward passes write: partials[block, c] is
// the sum over rows [block * kSumRows, ...), so the totals do not depend on the thread count.
constexpr std::int64_t kSumRows = 64;

struct ResidualLayerNormBackwardArgs {
  const void* dy = nullptr;  // [rows, dim] gradient of the output
  std::int64_t ld_dy = 0;
  const float* xhat = nullptr;  // [rows, dim] and
  const float* rstd = nullptr;  // [rows] from the forward
  const float* gamma = nullptr;
  std::int64_t rows = 0, dim = 0;
  Storage storage = Storage::kFloat32;  // of dy, d_x and d_res
  float dropout_keep = 1.0f;  // the forward's dropout
  std::uint64_t dropout_seed = 0;
  void* d_x = nullptr;  // [rows, dim] gradient of x (and bias_x): dropout applied
  std::int64_t ld_dx = 0;
  void* d_res = nullptr;  // [rows, dim] gradient of res (and bias_res), or null
  std::int64_t ld_dres = 0;
  // [ceil(rows / kSumRows), 4, dim]: partial sums of d gamma, d beta, d bias_x, d bias_res.
  float* partials = nullptr;
};

struct TanhBackwardArgs {
  const void* dy = nullptr;  // [rows, cols] gradient of tanh's output
  std::int64_t ld_dy = 0;
  const void* y = nullptr;  // [rows, cols] tanh's output
  std::int64_t ld_y = 0;
  std::int64_t rows = 0, cols = 0;
  Storage storage = Storage::kFloat32;
  void* dx = nullptr;  // [rows, cols] = dy * (1 - y^2); may be dy
  std::int64_t ld_dx = 0;
  float* partials = nullptr;  // [ceil(rows / kSumRows), cols] partial sums of dx (bias gradient)
};

struct BlockAttentionBackwardArgs {
  BlockAttentionArgs fwd;  // qkv, bias, hidden, shapes, rule, scale; out and lse as inputs
  const void* dout = nullptr;  // [B*L, >= H*hd] gradient of out, heads side by side
  std::int64_t ld_dout = 0;
  void* dqkv = nullptr;  // [B*L, >= 3*H*hd]: gradients of q, k, v (and of their biases) as in qkv
  std::int64_t ld_dqkv = 0;
  float* bias_partials = nullptr;  // [B, 3*H*hd] per-window sums of dqkv, or null
};

struct BiasTanhArgs {
  const void* x = nullptr;  // [rows, cols]
  std::int64_t ld_x = 0;
  const float* bias = nullptr;  // [cols] or null
  std::int64_t rows = 0, cols = 0;
  Storage storage = Storage::kFloat32;
  void* out = nullptr;  // [rows, cols]; may be x
  std::int64_t ld_out = 0;
};

// out = LayerNorm(x + bias_x + res + bias_res) * gamma + beta, per row.
void residual_layernorm(const ResidualLayerNormArgs& args, int num_threads);
// out = tanh(x + bias).
void bias_tanh(const BiasTanhArgs& args, int num_threads);
// Masked multi-head attention (both rules, as cpu/masked_attention.h defines them) of the fused
// projection. Hidden keys of rule "key" are skipped, as there. For bfloat16 storage, q, k and v
// plus their biases are rounded to bfloat16 before the dot products, on every ISA level.
void block_attention(const BlockAttentionArgs& args, int num_threads);

// Backward passes of the three above (flash-style for the attention: P recomputed from lse).
void residual_layernorm_backward(const ResidualLayerNormBackwardArgs& args, int num_threads);
void tanh_backward(const TanhBackwardArgs& args, int num_threads);
void block_attention_backward(const BlockAttentionBackwardArgs& args, int num_threads);

// The dropout mask the passes above apply for (seed, keep): out[r * cols + c] = 1 where kept.
void dropout_keep_mask(std::uint64_t seed, float keep, std::int64_t rows, std::int64_t cols,
                       std::uint8_t* out);

}  // namespace cpu
}  // namespace astromer_fast
