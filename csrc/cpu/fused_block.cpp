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

// Every kernel body below is an always-inlined template, instantiated once per ISA level by thin
// wrappers that carry the level's target attribute (see cpu/isa.h); the vector extensions then
// compile to that level's registers. The AVX-512 BF16 attention is separate, in intrinsics.

using bf16 = std::uint16_t;
typedef std::uint16_t vh __attribute__((vector_size(32)));  // 16 bfloat16
typedef std::uint32_t vu __attribute__((vector_size(64)));

AF_INLINE vf load16(const float* p) { return loadv(p); }
AF_INLINE vf load16(const bf16* p) {
  vh h;
  std::memcpy(&h, p, sizeof(h));
  const vu u = __builtin_convertvector(h, vu) << 16;
  vf f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
AF_INLINE void store16(float* p, vf v) { storev(p, v); }
// Round to nearest even, as torch does; NaN stays NaN (quiet).
AF_INLINE void store16(bf16* p, vf v) {
  vu u;
  std::memcpy(&u, &v, sizeof(u));
  const vu nan = (vu)(v != v);
  const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vu r = (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
  const vh h = __builtin_convertvector(r, vh);
  std::memcpy(p, &h, sizeof(h));
}

AF_INLINE vf bias16(const float* b, std::int64_t c) { return b ? loadv(b + c) : vf{}; }

// tanh: an odd polynomial below 0.625 (where 1 - 2/(e^2x + 1) would cancel), that formula above;
// |x| is clamped at 9, where tanh is 1 in float32. Within 2 ulp of libm on float32.
AF_INLINE vf vtanh(vf x) {
  const vi neg = x < 0.0f;
  vf ax = neg ? -x : x;
  ax = ax > 9.0f ? splat(9.0f) : ax;
  const vf z = ax * ax;
  vf p = splat(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const vf small = p * z * ax + ax;
  const vf large = 1.0f - 2.0f / (vexp(ax + ax) + 1.0f);
  const vf t = ax < 0.625f ? small : large;
  const vf r = neg ? -t : t;
  return x != x ? x : r;
}

// ---------------------------------------------------------------------------------------------
// Residual + LayerNorm (+ window means)
// ---------------------------------------------------------------------------------------------
template <class T>
AF_INLINE void layernorm_rows(const ResidualLayerNormArgs& a, std::int64_t r0, std::int64_t r1,
                              float* tmp, float* pool) {
  const T* x = static_cast<const T*>(a.x);
  const T* res = static_cast<const T*>(a.res);
  T* out = static_cast<T*>(a.out);
  const std::int64_t D = a.dim;
  std::int64_t n_valid = 0;
  if (pool) std::memset(pool, 0, static_cast<std::size_t>(D) * sizeof(float));
  for (std::int64_t r = r0; r < r1; ++r) {
    vf sum = {};
    for (std::int64_t c = 0; c < D; c += W) {
      vf v = load16(x + r * a.ld_x + c) + bias16(a.bias_x, c);
      if (res) v += load16(res + r * a.ld_res + c) + bias16(a.bias_res, c);
      storev(tmp + c, v);
      sum += v;
    }
    const float mean = hsum(sum) / static_cast<float>(D);
    vf sq = {};
    for (std::int64_t c = 0; c < D; c += W) {
      const vf d = loadv(tmp + c) - mean;
      sq += d * d;
    }
    const float rstd = 1.0f / std::sqrt(hsum(sq) / static_cast<float>(D) + a.eps);
    const bool pooled = pool && a.valid[r] != 0;
    n_valid += pooled;
    for (std::int64_t c = 0; c < D; c += W) {
      const vf y = (loadv(tmp + c) - mean) * rstd * loadv(a.gamma + c) + loadv(a.beta + c);
      store16(out + r * a.ld_out + c, y);
      if (pooled) storev(pool + c, loadv(pool + c) + y);
    }
  }
  if (pool) {
    const float inv = 1.0f / static_cast<float>(n_valid > 0 ? n_valid : 1);
    float* dst = a.pooled + (r0 / a.window_rows) * a.ld_pooled;
    for (std::int64_t c = 0; c < D; c += W) storev(dst + c, loadv(pool + c) * inv);
  }
}

template <class T>
AF_INLINE void tanh_rows(const BiasTanhArgs& a, std::int64_t r0, std::int64_t r1) {
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  for (std::int64_t r = r0; r < r1; ++r)
    for (std::int64_t c = 0; c < a.cols; c += W)
      store16(out + r * a.ld_out + c, vtanh(load16(x + r * a.ld_x + c) + bias16(a.bias, c)));
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
  std::vector<std::uint8_t> hidden;
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

template <class T>
AF_INLINE const T* head_col(const BlockAttentionArgs& a, std::int64_t b, std::int64_t col) {
  return static_cast<const T*>(a.qkv) + b * a.length * a.ld_qkv + col;
}

// The query rows of [q0, q1) to compute, into sc.qpos; returns their count. The others are
// zeroed in the output here.
template <class T>
AF_INLINE std::int64_t query_rows(const BlockAttentionArgs& a, std::int64_t b, std::int64_t h,
                                  std::int64_t q0, std::int64_t q1, AttnScratch& sc) {
  const std::uint8_t* hid = a.hidden + b * a.length;
  const bool skip = a.skip_hidden_queries && a.rule == kRuleKey;
  std::int64_t n = 0;
  T* out = static_cast<T*>(a.out);
  for (std::int64_t i = q0; i < q1; ++i) {
    if (skip && hid[i] != 0) {
      std::memset(out + (b * a.length + i) * a.ld_out + h * a.head_dim, 0,
                  static_cast<std::size_t>(a.head_dim) * sizeof(T));
      continue;
    }
    sc.qpos[static_cast<std::size_t>(n++)] = i;
  }
  return n;
}

template <class T>
AF_INLINE void attention_task_generic(const BlockAttentionArgs& a, std::int64_t bh,
                                      std::int64_t q0, std::int64_t q1, AttnScratch& sc) {
  const std::int64_t L = a.length, hd = a.head_dim, D = a.heads * hd, ld = a.ld_qkv;
  const std::int64_t b = bh / a.heads, h = bh % a.heads;
  const T* qcol = head_col<T>(a, b, h * hd);
  const T* kcol = head_col<T>(a, b, D + h * hd);
  const T* vcol = head_col<T>(a, b, 2 * D + h * hd);
  const float* bq = a.bias ? a.bias + h * hd : nullptr;
  const float* bk = a.bias ? a.bias + D + h * hd : nullptr;
  const float* bv = a.bias ? a.bias + 2 * D + h * hd : nullptr;
  const std::uint8_t* hid = a.hidden + b * L;
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
      for (std::int64_t d = 0; d < hd; d += W) {
        const vf kx = load16(kr + d) + bias16(bk, d);
        for (std::int64_t l = 0; l < W; ++l) kt[(d + l) * np + j] = kx[l];
        storev(vb + j * hd + d, load16(vr + d) + bias16(bv, d));
      }
    }
    for (std::int64_t d = 0; d < hd; ++d)
      for (std::int64_t j = sc.ks.n; j < np; ++j) kt[d * np + j] = 0.0f;
    sc.keys_of = bh;
  }
  const KeySet& ks = sc.ks;
  const std::int64_t np = sc.np;
  const std::int64_t nr = query_rows<T>(a, b, h, q0, q1, sc), nrp = round_up(nr, RB);
  float* qb = sc.qb.data();
  float* sb = sc.sb.data();
  float* ob = sc.ob.data();
  float* rinv = sc.rinv.data();
  for (std::int64_t r = 0; r < nrp; ++r)
    for (std::int64_t d = 0; d < hd; d += W)
      storev(qb + r * hd + d, r < nr ? load16(qcol + sc.qpos[r] * ld + d) + bias16(bq, d) : vf{});
  for (std::int64_t r0 = 0; r0 < nrp; r0 += RB)
    abt_rows4(qb + r0 * hd, hd, kt, np, hd, np, sb + r0 * np, np);
  for (std::int64_t r = 0; r < nrp; ++r) {
    float* s = sb + r * np;
    if (r >= nr) {
      std::memset(s, 0, static_cast<std::size_t>(np) * sizeof(float));
      rinv[r] = 0.0f;
      continue;
    }
    const bool qh = a.rule == kRuleQueryOrKeyPlus1 && hid[sc.qpos[r]] != 0;
    const float mx = biased_row(s, qh ? sc.b1q.data() : sc.b1.data(), sc.b2.data(), np, a.scale);
    vf acc = {};
    for (std::int64_t j = 0; j < np; j += W) {
      const vf p = vexp(loadv(s + j) - mx);
      storev(s + j, p);
      acc += p;
    }
    rinv[r] = 1.0f / hsum(acc);
  }
  for (std::int64_t r0 = 0; r0 < nrp; r0 += RB)
    ab_rows4_all(sb + r0 * np, np, vb, hd, hd, ks.n, ob + r0 * hd, rinv + r0);
  T* out = static_cast<T*>(a.out);
  for (std::int64_t r = 0; r < nr; ++r)
    for (std::int64_t d = 0; d < hd; d += W)
      store16(out + (b * L + sc.qpos[r]) * a.ld_out + h * hd + d, loadv(ob + r * hd + d));
}

#if AF_X86_LEVELS
// bfloat16 storage on CPUs with AVX-512 BF16: q k^T and p v as dot products of bfloat16 pairs
// (vdpbf16ps) with float32 sums. K is packed as pairs of channels (kp[p * np + j] = channels 2p,
// 2p+1 of key j), V as pairs of keys (vp[jp * hd + d] = keys 2jp, 2jp+1 of channel d), so that every
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

AF_TARGET_V4_BF16
void attention_task_avx512_bf16(const BlockAttentionArgs& a, std::int64_t bh, std::int64_t q0,
                                std::int64_t q1, AttnScratch& sc) {
  const std::int64_t L = a.length, hd = a.head_dim, hd2 = hd / 2, D = a.heads * hd, ld = a.ld_qkv;
  const std::int64_t b = bh / a.heads, h = bh % a.heads;
  const bf16* qcol = head_col<bf16>(a, b, h * hd);
  const bf16* kcol = head_col<bf16>(a, b, D + h * hd);
  const bf16* vcol = head_col<bf16>(a, b, 2 * D + h * hd);
  const float* bq = a.bias ? a.bias + h * hd : nullptr;
  const float* bk = a.bias ? a.bias + D + h * hd : nullptr;
  const float* bv = a.bias ? a.bias + 2 * D + h * hd : nullptr;
  const std::uint8_t* hid = a.hidden + b * L;
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
        const __m512i pairs = pack_pairs(_mm512_add_ps(bf16x16_to_ps(kr + d), bias_ps(bk, d)),
                                         _mm512_add_ps(bf16x16_to_ps(kr + d + 16), bias_ps(bk, d + 16)));
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
        if (j0 < n) x0 = _mm512_add_ps(bf16x16_to_ps(vcol + sc.ks.pos[j0] * ld + d), bias_ps(bv, d));
        if (j1 < n) x1 = _mm512_add_ps(bf16x16_to_ps(vcol + sc.ks.pos[j1] * ld + d), bias_ps(bv, d));
        const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x0));
        const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x1));
        _mm512_storeu_si512(reinterpret_cast<__m512i*>(vp + jp * hd + d),
                            _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
    sc.keys_of = bh;
  }
  const std::int64_t n = sc.ks.n, np = sc.np, np2 = np / 2, n2 = (n + 1) / 2;
  const std::int64_t nr = query_rows<bf16>(a, b, h, q0, q1, sc), nrp = round_up(nr, RB);
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
  // Logits of 4 queries x 32 keys per register block.
  for (std::int64_t r0 = 0; r0 < nrp; r0 += RB) {
    for (std::int64_t j0 = 0; j0 < np; j0 += KB) {
      __m512 acc[RB][2];
      for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      for (std::int64_t p = 0; p < hd2; ++p) {
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kp + p * np + j0);
        const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kp + p * np + j0 + 16);
        for (int r = 0; r < RB; ++r) {
          const __m512bh qa = (__m512bh)_mm512_set1_epi32(static_cast<int>(qp[(r0 + r) * hd2 + p]));
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qa, k0);
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qa, k1);
        }
      }
      for (int r = 0; r < RB; ++r) {
        _mm512_storeu_ps(sb + (r0 + r) * np + j0, acc[r][0]);
        _mm512_storeu_ps(sb + (r0 + r) * np + j0 + 16, acc[r][1]);
      }
    }
  }
  for (std::int64_t r = 0; r < nrp; ++r) {
    float* s = sb + r * np;
    std::uint32_t* pr = pp + r * np2;
    if (r >= nr) {
      std::memset(pr, 0, static_cast<std::size_t>(np2) * sizeof(std::uint32_t));
      rinv[r] = 0.0f;
      continue;
    }
    const bool qh = a.rule == kRuleQueryOrKeyPlus1 && hid[sc.qpos[r]] != 0;
    const float mx = biased_row(s, qh ? sc.b1q.data() : sc.b1.data(), sc.b2.data(), np, a.scale);
    vf acc = {};
    for (std::int64_t j = 0; j < np; j += KB) {
      const vf p0 = vexp(loadv(s + j) - mx), p1 = vexp(loadv(s + j + W) - mx);
      acc += p0 + p1;
      __m512 f0, f1;
      std::memcpy(&f0, &p0, sizeof(f0));
      std::memcpy(&f1, &p1, sizeof(f1));
      _mm512_storeu_si512(reinterpret_cast<__m512i*>(pr + j / 2), pack_pairs(f0, f1));
    }
    rinv[r] = 1.0f / hsum(acc);
  }
  // Outputs of 4 queries x 64 channels per register block, over the kept key pairs.
  bf16* out = static_cast<bf16*>(a.out);
  for (std::int64_t r0 = 0; r0 < nrp; r0 += RB) {
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
          const __m512bh pa = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[(r0 + r) * np2 + jp]));
          for (int c = 0; c < nv; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pa, vv[c]);
        }
      }
      for (int r = 0; r < RB && r0 + r < nr; ++r) {
        bf16* dst = out + (b * L + sc.qpos[r0 + r]) * a.ld_out + h * hd + d0;
        const __m512 s = _mm512_set1_ps(rinv[r0 + r]);
        for (int c = 0; c < nv; ++c)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], s)));
      }
    }
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// One wrapper per ISA level and storage
// ---------------------------------------------------------------------------------------------
using LayerNormFn = void (*)(const ResidualLayerNormArgs&, std::int64_t, std::int64_t, float*, float*);
using TanhFn = void (*)(const BiasTanhArgs&, std::int64_t, std::int64_t);
using AttentionFn = void (*)(const BlockAttentionArgs&, std::int64_t, std::int64_t, std::int64_t,
                             AttnScratch&);

struct Kernels {
  LayerNormFn layernorm[2];
  TanhFn tanh[2];
  AttentionFn attention[2];
};

#define AF_LEVEL_KERNELS(SUFFIX, TARGET)                                                          \
  template <class T>                                                                              \
  TARGET void layernorm_##SUFFIX(const ResidualLayerNormArgs& a, std::int64_t r0, std::int64_t r1, \
                                 float* tmp, float* pool) {                                      \
    layernorm_rows<T>(a, r0, r1, tmp, pool);                                                      \
  }                                                                                               \
  template <class T>                                                                              \
  TARGET void tanh_##SUFFIX(const BiasTanhArgs& a, std::int64_t r0, std::int64_t r1) {            \
    tanh_rows<T>(a, r0, r1);                                                                      \
  }                                                                                               \
  template <class T>                                                                              \
  TARGET void attention_##SUFFIX(const BlockAttentionArgs& a, std::int64_t bh, std::int64_t q0,   \
                                 std::int64_t q1, AttnScratch& sc) {                             \
    attention_task_generic<T>(a, bh, q0, q1, sc);                                                 \
  }                                                                                               \
  const Kernels kernels_##SUFFIX = {{layernorm_##SUFFIX<float>, layernorm_##SUFFIX<bf16>},        \
                                    {tanh_##SUFFIX<float>, tanh_##SUFFIX<bf16>},                  \
                                    {attention_##SUFFIX<float>, attention_##SUFFIX<bf16>}};

AF_LEVEL_KERNELS(baseline, )
#if AF_X86_LEVELS
AF_LEVEL_KERNELS(avx2, AF_TARGET_V3)
AF_LEVEL_KERNELS(avx512, AF_TARGET_V4)
const Kernels kernels_avx512_bf16 = {
    {layernorm_avx512<float>, layernorm_avx512<bf16>},
    {tanh_avx512<float>, tanh_avx512<bf16>},
    {attention_avx512<float>, attention_task_avx512_bf16}};
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
  if (a.pooled) {
    require(a.valid != nullptr && a.window_rows > 0 && a.rows % a.window_rows == 0, what,
            "pooling needs valid and rows a multiple of window_rows");
    require(a.ld_pooled >= a.dim, what, "ld_pooled must be >= dim");
  }
  if (a.rows == 0) return;
  const LayerNormFn fn = kernels_for(active_isa()).layernorm[s];
  const std::int64_t D = a.dim;
  if (a.pooled) {  // one task per window: its mean is summed in row order by one thread
    parallel_for(a.rows / a.window_rows, 1, num_threads, [&](std::int64_t w0, std::int64_t w1) {
      std::vector<float> tmp(static_cast<std::size_t>(2 * D));
      for (std::int64_t w = w0; w < w1; ++w)
        fn(a, w * a.window_rows, (w + 1) * a.window_rows, tmp.data(), tmp.data() + D);
    });
    return;
  }
  parallel_for(a.rows, 64, num_threads, [&](std::int64_t r0, std::int64_t r1) {
    std::vector<float> tmp(static_cast<std::size_t>(D));
    fn(a, r0, r1, tmp.data(), nullptr);
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
  require(a.batch >= 0 && a.length >= 0 && a.heads > 0, what, "bad batch, length or heads");
  require(a.head_dim > 0 && a.head_dim % W == 0 && a.head_dim <= 256, what,
          "head_dim must be a multiple of 16 and <= 256, got " + std::to_string(a.head_dim));
  require(a.rule == kRuleKey || a.rule == kRuleQueryOrKeyPlus1, what,
          "unknown mask rule " + std::to_string(a.rule));
  require(std::isfinite(a.scale), what, "scale must be finite");
  const std::int64_t D = a.heads * a.head_dim;
  require(a.ld_qkv >= 3 * D && a.ld_out >= D, what, "leading dimensions too small");
  const std::int64_t BH = a.batch * a.heads, L = a.length;
  if (BH == 0 || L == 0) return;
  require(a.qkv && a.hidden && a.out, what, "qkv, hidden and out must not be null");
  const Isa isa = active_isa();
  // The bfloat16 dot products take channels in pairs of 16-lane vectors: head_dim % 32.
  const AttentionFn fn =
      kernels_for(isa == Isa::kAvx512Bf16 && a.head_dim % 32 ? Isa::kAvx512 : isa).attention[s];
  const std::int64_t nqb = (L + QB - 1) / QB, hd = a.head_dim, Lp = round_up(L, KB);
  parallel_for(BH * nqb, 1, num_threads, [&](std::int64_t t0, std::int64_t t1) {
    AttnScratch sc;
    sc.pos.resize(static_cast<std::size_t>(L));
    sc.qpos.resize(static_cast<std::size_t>(QB));
    sc.hidden.resize(static_cast<std::size_t>(L));
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
      const std::int64_t bh = t / nqb, qb = t % nqb;
      fn(a, bh, qb * QB, std::min(L, (qb + 1) * QB), sc);
    }
  });
}

}  // namespace cpu
}  // namespace astromer_fast
