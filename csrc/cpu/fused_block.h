// The non-GEMM parts of an Astromer encoder block on the CPU, fused, for float32 or bfloat16
// activations. With the GEMMs left to the caller (oneDNN through torch), a block is
//
//   Y  = X [Wq; Wk; Wv; Wleak1]^T          (one GEMM; no biases: they are added below)
//   O  = block_attention(Y)                 q, k, v read out of Y by strides, + their biases
//   Z  = O Wo^T;          A = residual_layernorm(Z + bo, Y[:, 3d:] + bleak1)      (LN1)
//   U  = A [Wffn1; Wleak2]^T;  H = bias_tanh(U[:, :dff] + bffn1)
//   F  = H Wffn2^T;       X' = residual_layernorm(F + bffn2, U[:, dff:] + bleak2)  (LN2)
//
// and the window means of X' (the embedding) come out of the last residual_layernorm. Each pass
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
  int rule = 0;  // MaskRule of cpu/masked_attention.h
  float scale = 0.125f;
  // Rule "key" only: rows of hidden queries are written as zeros instead of computed. Exact for
  // embeddings, where hidden means padding: no visible row ever reads them.
  bool skip_hidden_queries = false;
  Storage storage = Storage::kFloat32;  // of qkv and out
  void* out = nullptr;  // [B*L, >= H*hd], heads side by side (head h at columns h*hd ..)
  std::int64_t ld_out = 0;
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
  // window_rows; pooled[w * ld_pooled + c] = sum of valid rows / max(1, valid rows).
  const std::uint8_t* valid = nullptr;  // [rows]
  std::int64_t window_rows = 0;
  float* pooled = nullptr;
  std::int64_t ld_pooled = 0;
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
// projection; no log-sum-exp (inference). Hidden keys of rule "key" are skipped, as there.
void block_attention(const BlockAttentionArgs& args, int num_threads);

}  // namespace cpu
}  // namespace astromer_fast
