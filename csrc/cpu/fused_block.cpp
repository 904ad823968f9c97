#include "cpu/fused_block.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/attention_keys.h"
#include "cpu/isa.h"
#include "cpu/masked_attention.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "cpu/vec.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(ASTROMER_FAST_NO_CLONES)
#define AF_X86_LEVELS 1
#include <immintrin.h>
#define AF_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#define AF_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define AF_TARGET_V4_BF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))
#else
#define AF_X86_LEVELS 0
#endif

namespace astromer_fast {
namespace cpu {
namespace {

// Every kernel body below is an always-inlined template over the storage type T and the vector
// width N, instantiated once per ISA level by thin wrappers that carry the level's target
// attribute (see cpu/isa.h) and its register width (cpu/simd.h). The AVX-512 BF16 attention is
// separate, in intrinsics.

using bf16 = std::uint16_t;
using simd::VF;
using simd::VI;
using simd::VU;

template <int N>
AF_INLINE VF<N> bias_n(const float* b, std::int64_t c) {
  return b ? simd::load<N>(b + c) : VF<N>{};
}

// A value rounded as it would be stored beside p: projections plus their biases enter the
// attention's dot products at the storage precision, on every ISA level.
template <int N>
AF_INLINE VF<N> round_like(VF<N> v, const float*) {
  return v;
}
template <int N>
AF_INLINE VF<N> round_like(VF<N> v, const bf16*) {
  alignas(64) bf16 tmp[N];
  simd::store<N>(tmp, v);
  return simd::load<N>(tmp);
}

// tanh: an odd polynomial below 0.625 (where 1 - 2/(e^2x + 1) would cancel), that formula above;
// |x| is clamped at 9, where tanh is 1 in float32. Within 2 ulp of libm on float32. NaN is told by
// its bits (see simd::store).
template <int N>
AF_INLINE VF<N> tanh_n(VF<N> x) {
  const VI<N> neg = x < 0.0f;
  VF<N> ax = neg ? -x : x;
  ax = ax > 9.0f ? simd::splat<N>(9.0f) : ax;
  const VF<N> z = ax * ax;
  VF<N> p = simd::splat<N>(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const VF<N> small = p * z * ax + ax;
  const VF<N> large = 1.0f - 2.0f / (simd::exp<N>(ax + ax) + 1.0f);
  const VF<N> t = ax < 0.625f ? small : large;
  const VF<N> r = neg ? -t : t;
  const VI<N> nan = ((VI<N>)x & 0x7fffffff) > 0x7f800000;
  return nan ? x : r;
}

// Dropout masks from a counter-based hash (murmur3's finaliser) of (seed, row, column): the
// backward regenerates them, so no mask is stored.
template <class U>
AF_INLINE U fmix32(U h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}
AF_INLINE std::uint32_t row_key(std::uint64_t seed, std::int64_t r) {
  const std::uint32_t lo = static_cast<std::uint32_t>(seed);
  const std::uint32_t hi = static_cast<std::uint32_t>(seed >> 32);
  return fmix32(lo ^ fmix32(hi + static_cast<std::uint32_t>(r) * 0x9e3779b9u +
                            static_cast<std::uint32_t>(static_cast<std::uint64_t>(r) >> 32)));
}

struct DropoutMask {
  bool on = false;
  std::uint32_t threshold = 0;  // keep where hash < threshold
  float inv_keep = 1.0f;
  std::uint64_t seed = 0;
  DropoutMask(float keep, std::uint64_t s) : seed(s) {
    on = keep < 1.0f;
    if (on) {
      threshold = static_cast<std::uint32_t>(static_cast<double>(keep) * 4294967296.0);
      inv_keep = 1.0f / keep;
    }
  }
  // 1/keep where columns c .. c+N-1 of the row with key rk are kept, else 0. The unsigned
  // comparison is made signed by flipping the sign bits: every level has that compare.
  template <int N>
  AF_INLINE VF<N> scale(std::uint32_t rk, std::int64_t c) const {
    static constexpr std::uint32_t kIota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    VU<N> col;
    std::memcpy(&col, kIota, sizeof(col));
    const VU<N> h = fmix32((col + static_cast<std::uint32_t>(c) + 1u) * 0x9e3779b9u ^ rk);
    const auto flipped = static_cast<std::int32_t>(threshold ^ 0x80000000u);
    const VI<N> kept = (VI<N>)(h ^ 0x80000000u) < flipped;
    return kept ? simd::splat<N>(inv_keep) : simd::splat<N>(0.0f);
  }
};

// ---------------------------------------------------------------------------------------------
// Residual + LayerNorm (+ window means)
// ---------------------------------------------------------------------------------------------
// Rows [r0, r1); with pool, they are window w, whose mean goes to a.pooled.
template <class T, int N>
AF_INLINE void layernorm_rows(const ResidualLayerNormArgs& a, std::int64_t r0, std::int64_t r1,
                              float* tmp, float* pool, std::int64_t w) {
  const T* x = static_cast<const T*>(a.x);
  const T* res = static_cast<const T*>(a.res);
  T* out = static_cast<T*>(a.out);
  const std::int64_t D = a.dim;
  std::int64_t n_valid = 0;
  if (pool) std::memset(pool, 0, static_cast<std::size_t>(D) * sizeof(float));
  const DropoutMask drop(a.dropout_keep, a.dropout_seed);
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint32_t rk = drop.on ? row_key(drop.seed, r) : 0u;
    VF<N> sum = {};
    for (std::int64_t c = 0; c < D; c += N) {
      VF<N> v = simd::load<N>(x + r * a.ld_x + c) + bias_n<N>(a.bias_x, c);
      if (drop.on) v *= drop.template scale<N>(rk, c);
      if (res) v += simd::load<N>(res + r * a.ld_res + c) + bias_n<N>(a.bias_res, c);
      simd::store<N>(tmp + c, v);
      sum += v;
    }
    const float mean = simd::reduce_add<N>(sum) / static_cast<float>(D);
    VF<N> sq = {};
    for (std::int64_t c = 0; c < D; c += N) {
      const VF<N> d = simd::load<N>(tmp + c) - mean;
      sq += d * d;
    }
    const float rstd = 1.0f / std::sqrt(simd::reduce_add<N>(sq) / static_cast<float>(D) + a.eps);
    const bool pooled = pool && (a.valid == nullptr || a.valid[r] != 0);
    n_valid += pooled;
    if (a.rstd) a.rstd[r] = rstd;
    for (std::int64_t c = 0; c < D; c += N) {
      const VF<N> xh = (simd::load<N>(tmp + c) - mean) * rstd;
      const VF<N> y = xh * simd::load<N>(a.gamma + c) + simd::load<N>(a.beta + c);
      simd::store<N>(out + r * a.ld_out + c, y);
      if (a.xhat) simd::store<N>(a.xhat + r * D + c, xh);
      if (pooled) simd::store<N>(pool + c, simd::load<N>(pool + c) + y);
    }
  }
  if (pool) {
    const float inv = 1.0f / static_cast<float>(n_valid > 0 ? n_valid : 1);
    float* dst = a.pooled + w * a.ld_pooled;
    for (std::int64_t c = 0; c < D; c += N) simd::store<N>(dst + c, simd::load<N>(pool + c) * inv);
  }
}

template <class T, int N>
AF_INLINE void tanh_rows(const BiasTanhArgs& a, std::int64_t r0, std::int64_t r1) {
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  for (std::int64_t r = r0; r < r1; ++r)
    for (std::int64_t c = 0; c < a.cols; c += N)
      simd::store<N>(out + r * a.ld_out + c, tanh_n<N>(simd::load<N>(x + r * a.ld_x + c) + bias_n<N>(a.bias, c)));
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma, for rows [r0, r1) (one block
// of kSumRows); the block's column sums go to part[0..4*dim).
template <class T, int N>
AF_INLINE void layernorm_backward_rows(const ResidualLayerNormBackwardArgs& a, std::int64_t r0,
                                       std::int64_t r1, float* g, float* part) {
  const T* dy = static_cast<const T*>(a.dy);
  T* d_x = static_cast<T*>(a.d_x);
  T* d_res = static_cast<T*>(a.d_res);
  const std::int64_t D = a.dim;
  const DropoutMask drop(a.dropout_keep, a.dropout_seed);
  std::memset(part, 0, static_cast<std::size_t>(4 * D) * sizeof(float));
  float *dgamma = part, *dbeta = part + D, *dbx = part + 2 * D, *dbr = part + 3 * D;
  for (std::int64_t r = r0; r < r1; ++r) {
    const float* xh = a.xhat + r * D;
    VF<N> sg = {}, sgx = {};
    for (std::int64_t c = 0; c < D; c += N) {
      const VF<N> d = simd::load<N>(dy + r * a.ld_dy + c);
      const VF<N> x = simd::load<N>(xh + c);
      const VF<N> gv = d * simd::load<N>(a.gamma + c);
      simd::store<N>(g + c, gv);
      sg += gv;
      sgx += gv * x;
      simd::store<N>(dgamma + c, simd::load<N>(dgamma + c) + d * x);
      simd::store<N>(dbeta + c, simd::load<N>(dbeta + c) + d);
    }
    const float inv_d = 1.0f / static_cast<float>(D);
    const float mg = simd::reduce_add<N>(sg) * inv_d, mgx = simd::reduce_add<N>(sgx) * inv_d;
    const float rs = a.rstd[r];
    const std::uint32_t rk = drop.on ? row_key(drop.seed, r) : 0u;
    for (std::int64_t c = 0; c < D; c += N) {
      const VF<N> dp = (simd::load<N>(g + c) - mg - simd::load<N>(xh + c) * mgx) * rs;
      const VF<N> dxv = drop.on ? dp * drop.template scale<N>(rk, c) : dp;
      simd::store<N>(d_x + r * a.ld_dx + c, dxv);
      simd::store<N>(dbx + c, simd::load<N>(dbx + c) + dxv);
      if (d_res) simd::store<N>(d_res + r * a.ld_dres + c, dp);
      simd::store<N>(dbr + c, simd::load<N>(dbr + c) + dp);
    }
  }
}

template <class T, int N>
AF_INLINE void tanh_backward_rows(const TanhBackwardArgs& a, std::int64_t r0, std::int64_t r1,
                                  float* part) {
  const T* dy = static_cast<const T*>(a.dy);
  const T* y = static_cast<const T*>(a.y);
  T* dx = static_cast<T*>(a.dx);
  std::memset(part, 0, static_cast<std::size_t>(a.cols) * sizeof(float));
  for (std::int64_t r = r0; r < r1; ++r)
    for (std::int64_t c = 0; c < a.cols; c += N) {
      const VF<N> yv = simd::load<N>(y + r * a.ld_y + c);
      const VF<N> d = simd::load<N>(dy + r * a.ld_dy + c) * (1.0f - yv * yv);
      simd::store<N>(dx + r * a.ld_dx + c, d);
      simd::store<N>(part + c, simd::load<N>(part + c) + d);
    }
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------
constexpr std::int64_t QB = 64;  // query rows per task
constexpr std::int64_t KB = 32;  // keys are padded to this (two vectors; bf16 pairs)

struct AttnScratch {
  std::vector<float> kt, vb, qb, sb, ob, b1, b2, b1q, rinv;
  std::vector<std::uint32_t> kp, vp, qp, pp;  // bfloat16 pairs (AVX-512 BF16 path)
  std::vector<std::int64_t> pos, qpos;
  std::vector<std::uint8_t> hidden, zeros;
  std::int64_t keys_of = -1;  // the (b, h) whose keys are prepared
  KeySet ks;
  std::int64_t np = 0;  // ks.n rounded up to KB: columns of the logits
};

void ensure(std::vector<float>& v, std::int64_t n) {
  if (static_cast<std::int64_t>(v.size()) < n) v.assign(static_cast<std::size_t>(n), 0.0f);
}
void ensure(std::vector<std::uint32_t>& v, std::int64_t n) {
  if (static_cast<std::int64_t>(v.size()) < n) v.assign(static_cast<std::size_t>(n), 0u);
}

// Window b's rows: the first, how many, and their hidden flags (all 0 when packed).
struct WindowRows {
  std::int64_t base, n;
  const std::uint8_t* hid;
};

AF_INLINE WindowRows window_rows(const BlockAttentionArgs& a, std::int64_t b,
                                 const std::uint8_t* zeros) {
  if (a.row_offsets) return {a.row_offsets[b], a.row_offsets[b + 1] - a.row_offsets[b], zeros};
  return {b * a.length, a.length, a.hidden + b * a.length};
}

template <class T>
AF_INLINE const T* head_col(const BlockAttentionArgs& a, const WindowRows& w, std::int64_t col) {
  return static_cast<const T*>(a.qkv) + w.base * a.ld_qkv + col;
}

// The query rows of [q0, q1) to compute, into sc.qpos; returns their count. The others are
// zeroed in the output here.
template <class T>
AF_INLINE std::int64_t query_rows(const BlockAttentionArgs& a, const WindowRows& w, std::int64_t h,
                                  std::int64_t q0, std::int64_t q1, AttnScratch& sc) {
  const bool skip = a.skip_hidden_queries && a.rule == kRuleKey;
  std::int64_t n = 0;
  T* out = static_cast<T*>(a.out);
  for (std::int64_t i = q0; i < q1; ++i) {
    if (skip && w.hid[i] != 0) {
      std::memset(out + (w.base + i) * a.ld_out + h * a.head_dim, 0,
                  static_cast<std::size_t>(a.head_dim) * sizeof(T));
      continue;
    }
    sc.qpos[static_cast<std::size_t>(n++)] = i;
  }
  return n;
}

template <class T, int N>
AF_INLINE void attention_task_generic(const BlockAttentionArgs& a, std::int64_t bh,
                                      std::int64_t q0, std::int64_t q1, AttnScratch& sc) {
  const std::int64_t hd = a.head_dim, D = a.heads * hd, ld = a.ld_qkv;
  const std::int64_t b = bh / a.heads, h = bh % a.heads;
  const WindowRows w = window_rows(a, b, sc.zeros.data());
  const std::int64_t L = w.n;
  const T* qcol = head_col<T>(a, w, h * hd);
  const T* kcol = head_col<T>(a, w, D + h * hd);
  const T* vcol = head_col<T>(a, w, 2 * D + h * hd);
  const float* bq = a.bias ? a.bias + h * hd : nullptr;
  const float* bk = a.bias ? a.bias + D + h * hd : nullptr;
  const float* bv = a.bias ? a.bias + 2 * D + h * hd : nullptr;
  const std::uint8_t* hid = w.hid;
  float* kt = sc.kt.data();
  float* vb = sc.vb.data();
  if (sc.keys_of != bh) {
    sc.ks = key_set(hid, L, a.rule, sc.pos.data(), sc.hidden.data());
    sc.np = round_up(sc.ks.n, KB);
    key_terms(sc.ks.hidden, sc.ks.n, sc.np, a.rule, sc.b1.data(), sc.b2.data(), sc.b1q.data());
    const std::int64_t np = sc.np;
    for (std::int64_t j = 0; j < sc.ks.n; ++j) {
      const T* kr = kcol + sc.ks.pos[j] * ld;
      const T* vr = vcol + sc.ks.pos[j] * ld;
      for (std::int64_t d = 0; d < hd; d += N) {
        const VF<N> kx = round_like<N>(simd::load<N>(kr + d) + bias_n<N>(bk, d), kr);
        for (std::int64_t l = 0; l < N; ++l) kt[(d + l) * np + j] = kx[l];
        simd::store<N>(vb + j * hd + d, round_like<N>(simd::load<N>(vr + d) + bias_n<N>(bv, d), vr));
      }
    }
    for (std::int64_t d = 0; d < hd; ++d)
      for (std::int64_t j = sc.ks.n; j < np; ++j) kt[d * np + j] = 0.0f;
    sc.keys_of = bh;
  }
  const KeySet& ks = sc.ks;
  const std::int64_t np = sc.np;
  const std::int64_t nr = query_rows<T>(a, w, h, q0, q1, sc), nrp = round_up(nr, RB);
  float* qb = sc.qb.data();
  float* sb = sc.sb.data();
  float* ob = sc.ob.data();
  float* rinv = sc.rinv.data();
  for (std::int64_t r = 0; r < nrp; ++r)
    for (std::int64_t d = 0; d < hd; d += N)
      simd::store<N>(qb + r * hd + d,
             r < nr ? round_like<N>(simd::load<N>(qcol + sc.qpos[r] * ld + d) + bias_n<N>(bq, d), qcol) : VF<N>{});
  for (std::int64_t r0 = 0; r0 < nrp; r0 += RB)
    simd::abt_rows4<N>(qb + r0 * hd, hd, kt, np, hd, np, sb + r0 * np, np);
  for (std::int64_t r = 0; r < nrp; ++r) {
    float* s = sb + r * np;
    if (r >= nr) {
      std::memset(s, 0, static_cast<std::size_t>(np) * sizeof(float));
      rinv[r] = 0.0f;
      continue;
    }
    const bool qh = a.rule == kRuleQueryOrKeyPlus1 && hid[sc.qpos[r]] != 0;
    const float mx = simd::biased_row<N>(s, qh ? sc.b1q.data() : sc.b1.data(), sc.b2.data(), np, a.scale);
    VF<N> acc = {};
    for (std::int64_t j = 0; j < np; j += N) {
      const VF<N> p = simd::exp<N>(simd::load<N>(s + j) - mx);
      simd::store<N>(s + j, p);
      acc += p;
    }
    const float l = simd::reduce_add<N>(acc);  // >= 1: the maximum contributes exp(0)
    rinv[r] = 1.0f / l;
    if (a.lse) a.lse[bh * a.length + sc.qpos[r]] = mx + std::log(l);
  }
  for (std::int64_t r0 = 0; r0 < nrp; r0 += RB)
    simd::ab_rows4_all<N>(sb + r0 * np, np, vb, hd, hd, ks.n, ob + r0 * hd, rinv + r0);
  T* out = static_cast<T*>(a.out);
  for (std::int64_t r = 0; r < nr; ++r)
    for (std::int64_t d = 0; d < hd; d += N)
      simd::store<N>(out + (w.base + sc.qpos[r]) * a.ld_out + h * hd + d, simd::load<N>(ob + r * hd + d));
}

struct AttnBackwardScratch {
  std::vector<float> kt, vt, kb, qb, dob, P, dS, T, ob, b1, b2, b1q, dv, sums;
  std::vector<std::int64_t> pos;
  std::vector<std::uint8_t> hidden;
};

// dq, dk, dv of one (b, h), as cpu/masked_attention.cpp's backward (P = exp(s' - lse) over the
// kept keys, dS = P (dO V^T - D) scale), on the fused layout; D_i = sum_j P_ij (dO V^T)_ij.
template <class T, int N>
AF_INLINE void attention_backward_task_generic(const BlockAttentionBackwardArgs& g,
                                               std::int64_t bh, AttnBackwardScratch& sc) {
  const BlockAttentionArgs& a = g.fwd;
  const std::int64_t L = a.length, hd = a.head_dim, D = a.heads * hd, ld = a.ld_qkv;
  const std::int64_t Lp = round_up(L, KB);
  const std::int64_t b = bh / a.heads, h = bh % a.heads;
  const WindowRows w = window_rows(a, b, nullptr);
  const T* qcol = head_col<T>(a, w, h * hd);
  const T* kcol = head_col<T>(a, w, D + h * hd);
  const T* vcol = head_col<T>(a, w, 2 * D + h * hd);
  const float* bq = a.bias ? a.bias + h * hd : nullptr;
  const float* bk = a.bias ? a.bias + D + h * hd : nullptr;
  const float* bv = a.bias ? a.bias + 2 * D + h * hd : nullptr;
  const T* dout = static_cast<const T*>(g.dout) + b * L * g.ld_dout + h * hd;
  T* dq = static_cast<T*>(g.dqkv) + b * L * g.ld_dqkv + h * hd;
  T* dk = dq + D;
  T* dvo = dq + 2 * D;
  const float* lse = a.lse + bh * L;
  const std::uint8_t* hid = a.hidden + b * L;
  float *kt = sc.kt.data(), *vt = sc.vt.data(), *kb = sc.kb.data(), *qb = sc.qb.data();
  float *dob = sc.dob.data(), *P = sc.P.data(), *dS = sc.dS.data(), *Tb = sc.T.data();
  float *ob = sc.ob.data(), *Dv = sc.dv.data();

  const KeySet ks = key_set(hid, L, a.rule, sc.pos.data(), sc.hidden.data());
  const std::int64_t np = round_up(ks.n, KB);
  float *b1 = sc.b1.data(), *b2 = sc.b2.data(), *b1q = sc.b1q.data();
  key_terms(ks.hidden, ks.n, np, a.rule, b1, b2, b1q);
  for (std::int64_t j = 0; j < np; ++j) {
    for (std::int64_t d = 0; d < hd; d += N) {
      VF<N> kx = {}, vx = {};
      if (j < ks.n) {
        const T* kr = kcol + ks.pos[j] * ld;
        const T* vr = vcol + ks.pos[j] * ld;
        kx = round_like<N>(simd::load<N>(kr + d) + bias_n<N>(bk, d), kr);
        vx = round_like<N>(simd::load<N>(vr + d) + bias_n<N>(bv, d), vr);
      }
      simd::store<N>(kb + j * hd + d, kx);
      for (std::int64_t l = 0; l < N; ++l) {
        kt[(d + l) * np + j] = kx[l];
        vt[(d + l) * np + j] = vx[l];
      }
    }
  }
  for (std::int64_t i = 0; i < Lp; ++i) {
    for (std::int64_t d = 0; d < hd; d += N) {
      VF<N> qx = {}, dx = {};
      if (i < L) {
        qx = round_like<N>(simd::load<N>(qcol + i * ld + d) + bias_n<N>(bq, d), qcol);
        dx = simd::load<N>(dout + i * g.ld_dout + d);
      }
      simd::store<N>(qb + i * hd + d, qx);
      simd::store<N>(dob + i * hd + d, dx);
    }
  }
  for (std::int64_t r0 = 0; r0 < Lp; r0 += RB) {
    simd::abt_rows4<N>(qb + r0 * hd, hd, kt, np, hd, np, P + r0 * np, np);
    simd::abt_rows4<N>(dob + r0 * hd, hd, vt, np, hd, np, dS + r0 * np, np);
  }
  for (std::int64_t i = 0; i < Lp; ++i) {
    float* p = P + i * np;
    float* ds = dS + i * np;
    if (i >= L) {
      std::memset(p, 0, static_cast<std::size_t>(np) * sizeof(float));
      std::memset(ds, 0, static_cast<std::size_t>(np) * sizeof(float));
      continue;
    }
    const bool qh = a.rule == kRuleQueryOrKeyPlus1 && hid[i] != 0;
    const float* bb1 = qh ? b1q : b1;
    const float li = lse[i];
    // D_i = sum_j P_ij dP_ij from the recomputed P and dP themselves, not dO_i . O_i: with O
    // rounded to bfloat16 the latter is off by ~2^-9, and dP - D cancels where P is peaked.
    VF<N> dd = {};
    for (std::int64_t j = 0; j < np; j += N) {
      const VF<N> x = (simd::load<N>(p + j) * a.scale + simd::load<N>(bb1 + j)) + simd::load<N>(b2 + j);
      const VF<N> pj = simd::exp<N>(x - li);
      simd::store<N>(p + j, pj);
      dd += pj * simd::load<N>(ds + j);
    }
    const float di = simd::reduce_add<N>(dd);
    Dv[i] = di;
    for (std::int64_t j = 0; j < np; j += N)
      simd::store<N>(ds + j, simd::load<N>(p + j) * (simd::load<N>(ds + j) - di) * a.scale);
  }
  float* sums = sc.sums.data();  // this (b, h)'s column sums of dq, dk, dv
  std::memset(sums, 0, static_cast<std::size_t>(3 * hd) * sizeof(float));
  // dq = dS K over the kept keys
  for (std::int64_t r0 = 0; r0 < Lp; r0 += RB)
    simd::ab_rows4_all<N>(dS + r0 * np, np, kb, hd, hd, ks.n, ob + r0 * hd, nullptr);
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t d = 0; d < hd; d += N) {
      const VF<N> x = simd::load<N>(ob + i * hd + d);
      simd::store<N>(dq + i * g.ld_dqkv + d, x);
      simd::store<N>(sums + d, simd::load<N>(sums + d) + x);
    }
  // dv = P^T dO and dk = dS^T Q for the kept keys; the others' are zero.
  for (int which = 0; which < 2; ++which) {
    transpose(which == 0 ? P : dS, Tb, Lp, np);
    for (std::int64_t r0 = 0; r0 < np; r0 += RB)
      simd::ab_rows4_all<N>(Tb + r0 * Lp, Lp, which == 0 ? dob : qb, hd, hd, L, ob + r0 * hd, nullptr);
    T* dst = which == 0 ? dvo : dk;
    float* s = sums + (which == 0 ? 2 : 1) * hd;
    for (std::int64_t i = 0; i < L; ++i)
      if (!ks.all) std::memset(dst + i * g.ld_dqkv, 0, static_cast<std::size_t>(hd) * sizeof(T));
    for (std::int64_t j = 0; j < ks.n; ++j)
      for (std::int64_t d = 0; d < hd; d += N) {
        const VF<N> x = simd::load<N>(ob + j * hd + d);
        simd::store<N>(dst + ks.pos[j] * g.ld_dqkv + d, x);
        simd::store<N>(s + d, simd::load<N>(s + d) + x);
      }
  }
  if (g.bias_partials)
    for (int part = 0; part < 3; ++part)
      std::memcpy(g.bias_partials + b * 3 * D + part * D + h * hd, sums + part * hd,
                  static_cast<std::size_t>(hd) * sizeof(float));
}

#if AF_X86_LEVELS
// bfloat16 storage on CPUs with AVX-512 BF16: q k^T and p v as dot products of bfloat16 pairs
// (vdpbf16ps) with float32 sums. K is packed as pairs of channels (kp[p * np + j] = channels 2p,
// 2p+1 of key j), V as pairs of keys (vp[jp * hd + d] = keys 2jp, 2jp+1 of channel d), so that
// every
// vector load feeds 16 lanes. q + bias and the probabilities are rounded to bfloat16 for the dot
// products, as a bfloat16 GPU kernel rounds them; the softmax itself is float32.
AF_TARGET_V4_BF16 AF_INLINE __m512i pack_pairs(__m512 lo_half, __m512 hi_half) {
  // 32 floats (lo_half = elements 0..15, hi_half = 16..31) to 16 pairs in element order.
  return (__m512i)_mm512_cvtne2ps_pbh(hi_half, lo_half);
}

AF_TARGET_V4_BF16 AF_INLINE __m512 bf16x16_to_ps(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

AF_TARGET_V4_BF16 AF_INLINE __m512 bias_ps(const float* b, std::int64_t c) {
  return b ? _mm512_loadu_ps(b + c) : _mm512_setzero_ps();
}

// sb[r * np + j0 + j] = q_r . k_j for 4 query rows (bfloat16 pairs at qp, hd2 per row) and the
// 16 * NV keys from j0 (pairs at kp[p * np + j]).
template <int NV>
AF_TARGET_V4_BF16 AF_INLINE void logits_block(const std::uint32_t* kp, std::int64_t np,
                                              const std::uint32_t* qp, std::int64_t hd2,
                                              std::int64_t j0, float* sb) {
  __m512 acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (std::int64_t p = 0; p < hd2; ++p) {
    __m512bh k[NV];
    for (int c = 0; c < NV; ++c) k[c] = (__m512bh)_mm512_loadu_si512(kp + p * np + j0 + 16 * c);
    for (int r = 0; r < RB; ++r) {
      const __m512bh qa = (__m512bh)_mm512_set1_epi32(static_cast<int>(qp[r * hd2 + p]));
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qa, k[c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(sb + r * np + j0 + 16 * c, acc[r][c]);
}

AF_TARGET_V4_BF16
void attention_task_avx512_bf16(const BlockAttentionArgs& a, std::int64_t bh, std::int64_t q0,
                                std::int64_t q1, AttnScratch& sc) {
  const std::int64_t hd = a.head_dim, hd2 = hd / 2, D = a.heads * hd, ld = a.ld_qkv;
  const std::int64_t b = bh / a.heads, h = bh % a.heads;
  const WindowRows w = window_rows(a, b, sc.zeros.data());
  const std::int64_t L = w.n;
  const bf16* qcol = head_col<bf16>(a, w, h * hd);
  const bf16* kcol = head_col<bf16>(a, w, D + h * hd);
  const bf16* vcol = head_col<bf16>(a, w, 2 * D + h * hd);
  const float* bq = a.bias ? a.bias + h * hd : nullptr;
  const float* bk = a.bias ? a.bias + D + h * hd : nullptr;
  const float* bv = a.bias ? a.bias + 2 * D + h * hd : nullptr;
  const std::uint8_t* hid = w.hid;
  std::uint32_t* kp = sc.kp.data();
  std::uint32_t* vp = sc.vp.data();
  if (sc.keys_of != bh) {
    sc.ks = key_set(hid, L, a.rule, sc.pos.data(), sc.hidden.data());
    sc.np = round_up(sc.ks.n, KB);
    key_terms(sc.ks.hidden, sc.ks.n, sc.np, a.rule, sc.b1.data(), sc.b2.data(), sc.b1q.data());
    const std::int64_t n = sc.ks.n, np = sc.np;
    alignas(64) std::uint32_t tmp[16];
    for (std::int64_t j = 0; j < n; ++j) {
      const bf16* kr = kcol + sc.ks.pos[j] * ld;
      for (std::int64_t d = 0; d < hd; d += 32) {
        const __m512 lo = _mm512_add_ps(bf16x16_to_ps(kr + d), bias_ps(bk, d));
        const __m512 hi = _mm512_add_ps(bf16x16_to_ps(kr + d + 16), bias_ps(bk, d + 16));
        const __m512i pairs = pack_pairs(lo, hi);
        _mm512_store_si512(reinterpret_cast<__m512i*>(tmp), pairs);
        for (std::int64_t l = 0; l < 16; ++l) kp[(d / 2 + l) * np + j] = tmp[l];
      }
    }
    for (std::int64_t p = 0; p < hd2; ++p)
      for (std::int64_t j = n; j < np; ++j) kp[p * np + j] = 0u;
    for (std::int64_t jp = 0; jp < np / 2; ++jp) {
      const std::int64_t j0 = 2 * jp, j1 = 2 * jp + 1;
      for (std::int64_t d = 0; d < hd; d += 16) {
        __m512 x0 = _mm512_setzero_ps(), x1 = _mm512_setzero_ps();
        const __m512 b = bias_ps(bv, d);
        if (j0 < n) x0 = _mm512_add_ps(bf16x16_to_ps(vcol + sc.ks.pos[j0] * ld + d), b);
        if (j1 < n) x1 = _mm512_add_ps(bf16x16_to_ps(vcol + sc.ks.pos[j1] * ld + d), b);
        const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x0));
        const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x1));
        _mm512_storeu_si512(reinterpret_cast<__m512i*>(vp + jp * hd + d),
                            _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
    sc.keys_of = bh;
  }
  const std::int64_t n = sc.ks.n, np = sc.np, np2 = np / 2, n2 = (n + 1) / 2;
  const std::int64_t nr = query_rows<bf16>(a, w, h, q0, q1, sc), nrp = round_up(nr, RB);
  std::uint32_t* qp = sc.qp.data();
  std::uint32_t* pp = sc.pp.data();
  float* sb = sc.sb.data();
  float* rinv = sc.rinv.data();
  for (std::int64_t r = 0; r < nrp; ++r) {
    for (std::int64_t d = 0; d < hd; d += 32) {
      __m512i pairs = _mm512_setzero_si512();
      if (r < nr) {
        const bf16* qr = qcol + sc.qpos[r] * ld;
        pairs = pack_pairs(_mm512_add_ps(bf16x16_to_ps(qr + d), bias_ps(bq, d)),
                           _mm512_add_ps(bf16x16_to_ps(qr + d + 16), bias_ps(bq, d + 16)));
      }
      _mm512_storeu_si512(reinterpret_cast<__m512i*>(qp + r * hd2 + d / 2), pairs);
    }
  }
  // Four queries at a time, start to finish (logits, softmax, outputs), so that their logits and
  // probabilities stay in the first-level cache between the three steps.
  bf16* out = static_cast<bf16*>(a.out);
  for (std::int64_t r0 = 0; r0 < nrp; r0 += RB) {
    // Logits of 4 queries x 64 keys per register block (32 at the end of an odd row).
    std::int64_t j0 = 0;
    for (; j0 + 2 * KB <= np; j0 += 2 * KB)
      logits_block<4>(kp, np, qp + r0 * hd2, hd2, j0, sb + r0 * np);
    if (j0 < np) logits_block<2>(kp, np, qp + r0 * hd2, hd2, j0, sb + r0 * np);
    for (std::int64_t r = r0; r < r0 + RB; ++r) {
      float* s = sb + r * np;
      std::uint32_t* pr = pp + r * np2;
      if (r >= nr) {
        std::memset(pr, 0, static_cast<std::size_t>(np2) * sizeof(std::uint32_t));
        rinv[r] = 0.0f;
        continue;
      }
      const bool qh = a.rule == kRuleQueryOrKeyPlus1 && hid[sc.qpos[r]] != 0;
      const float mx =
          simd::biased_row<16>(s, qh ? sc.b1q.data() : sc.b1.data(), sc.b2.data(), np, a.scale);
      VF<16> acc = {};
      for (std::int64_t j = 0; j < np; j += KB) {
        const VF<16> p0 = simd::exp<16>(simd::load<16>(s + j) - mx);
        const VF<16> p1 = simd::exp<16>(simd::load<16>(s + j + 16) - mx);
        acc += p0 + p1;
        __m512 f0, f1;
        std::memcpy(&f0, &p0, sizeof(f0));
        std::memcpy(&f1, &p1, sizeof(f1));
        _mm512_storeu_si512(reinterpret_cast<__m512i*>(pr + j / 2), pack_pairs(f0, f1));
      }
      const float l = simd::reduce_add<16>(acc);
      rinv[r] = 1.0f / l;
      if (a.lse) a.lse[bh * a.length + sc.qpos[r]] = mx + std::log(l);
    }
    // Outputs of 4 queries x 64 channels per register block, over the kept key pairs.
    for (std::int64_t d0 = 0; d0 < hd; d0 += 64) {
      const int nv = static_cast<int>(hd - d0 >= 64 ? 4 : (hd - d0) / 16);
      __m512 acc[RB][4];
      for (int r = 0; r < RB; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
      for (std::int64_t jp = 0; jp < n2; ++jp) {
        __m512bh vv[4];
        for (int c = 0; c < nv; ++c)
          vv[c] = (__m512bh)_mm512_loadu_si512(vp + jp * hd + d0 + 16 * c);
        for (int r = 0; r < RB; ++r) {
          const __m512bh pa =
              (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[(r0 + r) * np2 + jp]));
          for (int c = 0; c < nv; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pa, vv[c]);
        }
      }
      for (int r = 0; r < RB && r0 + r < nr; ++r) {
        bf16* dst = out + (w.base + sc.qpos[r0 + r]) * a.ld_out + h * hd + d0;
        const __m512 sc16 = _mm512_set1_ps(rinv[r0 + r]);
        for (int c = 0; c < nv; ++c)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], sc16)));
      }
    }
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// One wrapper per ISA level and storage
// ---------------------------------------------------------------------------------------------
using LayerNormFn = void (*)(const ResidualLayerNormArgs&, std::int64_t, std::int64_t, float*,
                             float*, std::int64_t);
using TanhFn = void (*)(const BiasTanhArgs&, std::int64_t, std::int64_t);
using AttentionFn = void (*)(const BlockAttentionArgs&, std::int64_t, std::int64_t, std::int64_t,
                             AttnScratch&);
using LayerNormBackwardFn = void (*)(const ResidualLayerNormBackwardArgs&, std::int64_t,
                                     std::int64_t, float*, float*);
using TanhBackwardFn = void (*)(const TanhBackwardArgs&, std::int64_t, std::int64_t, float*);
using AttentionBackwardFn = void (*)(const BlockAttentionBackwardArgs&, std::int64_t,
                                     AttnBackwardScratch&);

struct Kernels {  // [0]: float32 storage, [1]: bfloat16
  LayerNormFn layernorm[2];
  TanhFn tanh[2];
  AttentionFn attention[2];
  LayerNormBackwardFn layernorm_backward[2];
  TanhBackwardFn tanh_backward[2];
  AttentionBackwardFn attention_backward[2];
};

#define AF_LEVEL_KERNELS(SUFFIX, TARGET, N)                                                        \
  template <class T>                                                                              \
  TARGET void layernorm_##SUFFIX(const ResidualLayerNormArgs& a, std::int64_t r0, std::int64_t r1, \
                                 float* tmp, float* pool, std::int64_t w) {                      \
    layernorm_rows<T, N>(a, r0, r1, tmp, pool, w);                                                   \
  }                                                                                               \
  template <class T>                                                                              \
  TARGET void tanh_##SUFFIX(const BiasTanhArgs& a, std::int64_t r0, std::int64_t r1) {            \
    tanh_rows<T, N>(a, r0, r1);                                                                      \
  }                                                                                               \
  template <class T>                                                                              \
  TARGET void attention_##SUFFIX(const BlockAttentionArgs& a, std::int64_t bh, std::int64_t q0,   \
                                 std::int64_t q1, AttnScratch& sc) {                             \
    attention_task_generic<T, N>(a, bh, q0, q1, sc);                                                 \
  }                                                                                               \
  template <class T>                                                                              \
  TARGET void layernorm_backward_##SUFFIX(const ResidualLayerNormBackwardArgs& a, std::int64_t r0, \
                                          std::int64_t r1, float* g, float* part) {              \
    layernorm_backward_rows<T, N>(a, r0, r1, g, part);                                               \
  }                                                                                               \
  template <class T>                                                                              \
  TARGET void tanh_backward_##SUFFIX(const TanhBackwardArgs& a, std::int64_t r0, std::int64_t r1, \
                                     float* part) {                                               \
    tanh_backward_rows<T, N>(a, r0, r1, part);                                                       \
  }                                                                                               \
  template <class T>                                                                              \
  TARGET void attention_backward_##SUFFIX(const BlockAttentionBackwardArgs& g, std::int64_t bh,   \
                                          AttnBackwardScratch& sc) {                              \
    attention_backward_task_generic<T, N>(g, bh, sc);                                                \
  }                                                                                               \
  const Kernels kernels_##SUFFIX = {                                                              \
      {layernorm_##SUFFIX<float>, layernorm_##SUFFIX<bf16>},                                      \
      {tanh_##SUFFIX<float>, tanh_##SUFFIX<bf16>},                                                \
      {attention_##SUFFIX<float>, attention_##SUFFIX<bf16>},                                      \
      {layernorm_backward_##SUFFIX<float>, layernorm_backward_##SUFFIX<bf16>},                    \
      {tanh_backward_##SUFFIX<float>, tanh_backward_##SUFFIX<bf16>},                              \
      {attention_backward_##SUFFIX<float>, attention_backward_##SUFFIX<bf16>}};

AF_LEVEL_KERNELS(baseline, , 4)
#if AF_X86_LEVELS
AF_LEVEL_KERNELS(avx2, AF_TARGET_V3, 8)
AF_LEVEL_KERNELS(avx512, AF_TARGET_V4, 16)
// AVX-512 BF16 adds the bfloat16 dot-product attention forward; the rest is the AVX-512 code.
const Kernels kernels_avx512_bf16 = {
    {layernorm_avx512<float>, layernorm_avx512<bf16>},
    {tanh_avx512<float>, tanh_avx512<bf16>},
    {attention_avx512<float>, attention_task_avx512_bf16},
    {layernorm_backward_avx512<float>, layernorm_backward_avx512<bf16>},
    {tanh_backward_avx512<float>, tanh_backward_avx512<bf16>},
    {attention_backward_avx512<float>, attention_backward_avx512<bf16>}};
#endif

const Kernels& kernels_for(Isa isa) {
#if AF_X86_LEVELS
  switch (isa) {
    case Isa::kAvx512Bf16: return kernels_avx512_bf16;
    case Isa::kAvx512: return kernels_avx512;
    case Isa::kAvx2: return kernels_avx2;
    default: return kernels_baseline;
  }
#else
  (void)isa;
  return kernels_baseline;
#endif
}

int storage_index(Storage s, const char* what) {
  if (s != Storage::kFloat32 && s != Storage::kBFloat16)
    throw std::invalid_argument(std::string(what) + ": unknown storage");
  return s == Storage::kBFloat16 ? 1 : 0;
}

void require(bool ok, const char* what, const std::string& why) {
  if (!ok) throw std::invalid_argument(std::string(what) + ": " + why);
}

void check_attention_args(const BlockAttentionArgs& a, const char* what) {
  require(a.batch >= 0 && a.length >= 0 && a.heads > 0, what, "bad batch, length or heads");
  require(a.head_dim > 0 && a.head_dim % W == 0 && a.head_dim <= 256, what,
          "head_dim must be a multiple of 16 and <= 256, got " + std::to_string(a.head_dim));
  require(a.rule == kRuleKey || a.rule == kRuleQueryOrKeyPlus1, what,
          "unknown mask rule " + std::to_string(a.rule));
  require(std::isfinite(a.scale), what, "scale must be finite");
  const std::int64_t D = a.heads * a.head_dim;
  require(a.ld_qkv >= 3 * D && a.ld_out >= D, what, "leading dimensions too small");
  if (a.batch * a.heads * a.length > 0)
    require(a.qkv && (a.hidden || a.row_offsets) && a.out, what,
            "qkv, hidden (or row_offsets) and out must not be null");
}

}  // namespace

void residual_layernorm(const ResidualLayerNormArgs& a, int num_threads) {
  const char* what = "residual_layernorm";
  const int s = storage_index(a.storage, what);
  require(a.rows >= 0 && a.dim > 0 && a.dim % W == 0, what,
          "dim must be a positive multiple of 16, got " + std::to_string(a.dim));
  require(a.ld_x >= a.dim && a.ld_out >= a.dim && (!a.res || a.ld_res >= a.dim), what,
          "leading dimensions must be >= dim");
  require(a.x && a.out && a.gamma && a.beta, what, "x, out, gamma and beta must not be null");
  require(std::isfinite(a.eps) && a.eps >= 0.0f, what, "eps must be finite and >= 0");
  require(a.dropout_keep > 0.0f && a.dropout_keep <= 1.0f, what, "dropout_keep must be in (0, 1]");
  if (a.pooled) {
    if (a.row_offsets) {
      require(a.windows >= 0 && a.row_offsets[0] == 0 && a.row_offsets[a.windows] == a.rows, what,
              "row_offsets must run from 0 to rows");
      for (std::int64_t w = 0; w < a.windows; ++w)
        require(a.row_offsets[w + 1] >= a.row_offsets[w], what, "row_offsets must not decrease");
    } else {
      require(a.valid != nullptr && a.window_rows > 0 && a.rows % a.window_rows == 0, what,
              "pooling needs valid and rows a multiple of window_rows (or row_offsets)");
    }
    require(a.ld_pooled >= a.dim, what, "ld_pooled must be >= dim");
  }
  if (a.rows == 0 && !(a.pooled && a.row_offsets)) return;
  const LayerNormFn fn = kernels_for(active_isa()).layernorm[s];
  const std::int64_t D = a.dim;
  if (a.pooled) {  // one task per window: its mean is summed in row order by one thread
    const std::int64_t n_windows = a.row_offsets ? a.windows : a.rows / a.window_rows;
    parallel_for(n_windows, 1, num_threads, [&](std::int64_t w0, std::int64_t w1) {
      std::vector<float> tmp(static_cast<std::size_t>(2 * D));
      for (std::int64_t w = w0; w < w1; ++w) {
        const std::int64_t r0 = a.row_offsets ? a.row_offsets[w] : w * a.window_rows;
        const std::int64_t r1 = a.row_offsets ? a.row_offsets[w + 1] : (w + 1) * a.window_rows;
        fn(a, r0, r1, tmp.data(), tmp.data() + D, w);
      }
    });
    return;
  }
  parallel_for(a.rows, 64, num_threads, [&](std::int64_t r0, std::int64_t r1) {
    std::vector<float> tmp(static_cast<std::size_t>(D));
    fn(a, r0, r1, tmp.data(), nullptr, 0);
  });
}

void bias_tanh(const BiasTanhArgs& a, int num_threads) {
  const char* what = "bias_tanh";
  const int s = storage_index(a.storage, what);
  require(a.rows >= 0 && a.cols > 0 && a.cols % W == 0, what,
          "cols must be a positive multiple of 16, got " + std::to_string(a.cols));
  require(a.ld_x >= a.cols && a.ld_out >= a.cols, what, "leading dimensions must be >= cols");
  require(a.x && a.out, what, "x and out must not be null");
  if (a.rows == 0) return;
  const TanhFn fn = kernels_for(active_isa()).tanh[s];
  parallel_for(a.rows, 32, num_threads, [&](std::int64_t r0, std::int64_t r1) { fn(a, r0, r1); });
}

void block_attention(const BlockAttentionArgs& a, int num_threads) {
  const char* what = "block_attention";
  const int s = storage_index(a.storage, what);
  check_attention_args(a, what);
  const std::int64_t BH = a.batch * a.heads, L = a.length;
  if (BH == 0 || L == 0) return;
  const Isa isa = active_isa();
  // The bfloat16 dot products take channels in pairs of 16-lane vectors: head_dim % 32.
  const AttentionFn fn =
      kernels_for(isa == Isa::kAvx512Bf16 && a.head_dim % 32 ? Isa::kAvx512 : isa).attention[s];
  if (a.row_offsets) {
    require(a.rule == kRuleKey, what, "packed windows (row_offsets) need mask rule key");
    for (std::int64_t b = 0; b < a.batch; ++b) {
      const std::int64_t n = a.row_offsets[b + 1] - a.row_offsets[b];
      require(n >= 0 && n <= L && a.row_offsets[0] >= 0, what,
              "row_offsets must not decrease, and no window may be longer than length");
    }
  }
  // Tasks: (b, h, block of QB queries); a packed window has as many blocks as its rows need.
  std::vector<std::int64_t> task_bh, task_q0;
  for (std::int64_t bh = 0; bh < BH; ++bh) {
    const std::int64_t b = bh / a.heads;
    const std::int64_t n = a.row_offsets ? a.row_offsets[b + 1] - a.row_offsets[b] : L;
    for (std::int64_t q0 = 0; q0 < n; q0 += QB) {
      task_bh.push_back(bh);
      task_q0.push_back(q0);
    }
  }
  const std::int64_t hd = a.head_dim, Lp = round_up(L, KB);
  parallel_for(static_cast<std::int64_t>(task_bh.size()), 1, num_threads,
               [&](std::int64_t t0, std::int64_t t1) {
    AttnScratch sc;
    sc.pos.resize(static_cast<std::size_t>(L));
    sc.qpos.resize(static_cast<std::size_t>(QB));
    sc.hidden.resize(static_cast<std::size_t>(L));
    sc.zeros.assign(static_cast<std::size_t>(L), 0);
    ensure(sc.b1, Lp);
    ensure(sc.b2, Lp);
    ensure(sc.b1q, Lp);
    ensure(sc.rinv, QB);
    ensure(sc.sb, QB * Lp);
    ensure(sc.kt, hd * Lp);
    ensure(sc.vb, Lp * hd);
    ensure(sc.qb, QB * hd);
    ensure(sc.ob, QB * hd);
    if (s == 1) {
      ensure(sc.kp, hd / 2 * Lp);
      ensure(sc.vp, Lp / 2 * hd);
      ensure(sc.qp, QB * hd / 2);
      ensure(sc.pp, QB * Lp / 2);
    }
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t bh = task_bh[static_cast<std::size_t>(t)];
      const std::int64_t q0 = task_q0[static_cast<std::size_t>(t)], b = bh / a.heads;
      const std::int64_t n = a.row_offsets ? a.row_offsets[b + 1] - a.row_offsets[b] : L;
      fn(a, bh, q0, std::min(n, q0 + QB), sc);
    }
  });
}

void residual_layernorm_backward(const ResidualLayerNormBackwardArgs& a, int num_threads) {
  const char* what = "residual_layernorm_backward";
  const int s = storage_index(a.storage, what);
  require(a.rows >= 0 && a.dim > 0 && a.dim % W == 0, what,
          "dim must be a positive multiple of 16, got " + std::to_string(a.dim));
  require(a.ld_dy >= a.dim && a.ld_dx >= a.dim && (!a.d_res || a.ld_dres >= a.dim), what,
          "leading dimensions must be >= dim");
  require(a.dy && a.xhat && a.rstd && a.gamma && a.d_x && a.partials, what,
          "dy, xhat, rstd, gamma, d_x and partials must not be null");
  if (a.rows == 0) return;
  const LayerNormBackwardFn fn = kernels_for(active_isa()).layernorm_backward[s];
  const std::int64_t D = a.dim, blocks = (a.rows + kSumRows - 1) / kSumRows;
  parallel_for(blocks, 1, num_threads, [&](std::int64_t k0, std::int64_t k1) {
    std::vector<float> g(static_cast<std::size_t>(D));
    for (std::int64_t k = k0; k < k1; ++k)
      fn(a, k * kSumRows, std::min(a.rows, (k + 1) * kSumRows), g.data(), a.partials + k * 4 * D);
  });
}

void tanh_backward(const TanhBackwardArgs& a, int num_threads) {
  const char* what = "tanh_backward";
  const int s = storage_index(a.storage, what);
  require(a.rows >= 0 && a.cols > 0 && a.cols % W == 0, what,
          "cols must be a positive multiple of 16, got " + std::to_string(a.cols));
  require(a.ld_dy >= a.cols && a.ld_y >= a.cols && a.ld_dx >= a.cols, what,
          "leading dimensions must be >= cols");
  require(a.dy && a.y && a.dx && a.partials, what, "dy, y, dx and partials must not be null");
  if (a.rows == 0) return;
  const TanhBackwardFn fn = kernels_for(active_isa()).tanh_backward[s];
  const std::int64_t blocks = (a.rows + kSumRows - 1) / kSumRows;
  parallel_for(blocks, 1, num_threads, [&](std::int64_t k0, std::int64_t k1) {
    for (std::int64_t k = k0; k < k1; ++k)
      fn(a, k * kSumRows, std::min(a.rows, (k + 1) * kSumRows), a.partials + k * a.cols);
  });
}

void block_attention_backward(const BlockAttentionBackwardArgs& g, int num_threads) {
  const char* what = "block_attention_backward";
  const BlockAttentionArgs& a = g.fwd;
  const int s = storage_index(a.storage, what);
  check_attention_args(a, what);
  const std::int64_t D = a.heads * a.head_dim;
  require(g.ld_dout >= D && g.ld_dqkv >= 3 * D, what, "leading dimensions too small");
  const std::int64_t BH = a.batch * a.heads, L = a.length;
  if (BH == 0 || L == 0) return;
  require(a.out && a.lse && g.dout && g.dqkv, what, "out, lse, dout and dqkv must not be null");
  require(a.row_offsets == nullptr, what, "packed windows are for inference only");
  const AttentionBackwardFn fn = kernels_for(active_isa()).attention_backward[s];
  const std::int64_t hd = a.head_dim, Lp = round_up(L, KB);
  parallel_for(BH, 1, num_threads, [&](std::int64_t t0, std::int64_t t1) {
    AttnBackwardScratch sc;
    sc.pos.resize(static_cast<std::size_t>(L));
    sc.hidden.resize(static_cast<std::size_t>(L));
    for (auto* v : {&sc.kt, &sc.vt}) ensure(*v, hd * Lp);
    for (auto* v : {&sc.kb, &sc.qb, &sc.dob, &sc.ob}) ensure(*v, Lp * hd);
    for (auto* v : {&sc.P, &sc.dS, &sc.T}) ensure(*v, Lp * Lp);
    for (auto* v : {&sc.b1, &sc.b2, &sc.b1q, &sc.dv}) ensure(*v, Lp);
    ensure(sc.sums, 3 * hd);
    for (std::int64_t t = t0; t < t1; ++t) fn(g, t, sc);
  });
}

void dropout_keep_mask(std::uint64_t seed, float keep, std::int64_t rows, std::int64_t cols,
                       std::uint8_t* out) {
  require(cols % W == 0 && rows >= 0, "dropout_keep_mask", "cols must be a multiple of 16");
  require(keep > 0.0f && keep <= 1.0f, "dropout_keep_mask", "keep must be in (0, 1]");
  const DropoutMask drop(keep, seed);
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::uint32_t rk = drop.on ? row_key(seed, r) : 0u;
    for (std::int64_t c = 0; c < cols; c += W) {
      const VF<16> m = drop.on ? drop.scale<16>(rk, c) : simd::splat<16>(1.0f);
      for (std::int64_t l = 0; l < W; ++l) out[r * cols + c + l] = m[l] != 0.0f;
    }
  }
}

}  // namespace cpu
}  // namespace astromer_fast
