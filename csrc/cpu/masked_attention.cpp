#include "cpu/masked_attention.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/common.h"
#include "cpu/parallel.h"

// Vector-extension helpers are always inlined, so the ABI note about passing 64-byte vectors is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace astromer_fast {
namespace cpu {
namespace {

// The task functions are cloned for x86-64-v4 (AVX-512) and x86-64-v3 (AVX2+FMA) machines and picked
// at load time (ASTROMER_FAST_CLONES_V4, cpu/common.h);
// the baseline x86-64 build is SSE2. The inner loops use GCC vector extensions of 16 floats, which
// each clone lowers to one zmm, two ymm or four xmm registers, so the register blocking below is
// explicit rather than left to the auto-vectoriser (which would need -ffast-math for reductions).
#define AF_INLINE inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(64)));
typedef std::int32_t vi __attribute__((vector_size(64)));
constexpr std::int64_t W = 16;  // floats per vf
constexpr std::int64_t RB = 4;  // rows per register block
constexpr std::int64_t QB = 64;  // query rows per forward task

AF_INLINE vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
AF_INLINE void storev(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
AF_INLINE vf splat(float x) { return vf{} + x; }

// exp(x) for x <= ~88, with x < -87 flushed to 0 (true values < 1.7e-38): Cephes expf
// (Cody-Waite reduction by ln 2, degree-5 minimax), ~1 ulp, branch-free.
AF_INLINE vf vexp(vf x) {
  const vf lo = splat(-87.0f);
  const vi under = x < lo;
  x = under ? lo : x;
  const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = x * 1.44269504088896341f + shifter;
  const vf n = t - shifter;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vi ni = (vi)t - (vi)shifter;
  const vi e = (ni + 127) << 23;
  const vf y = p * (vf)e;
  return under ? splat(0.0f) : y;
}

AF_INLINE float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}
AF_INLINE float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// C[r, j] = sum_x A[r, x] * Bt[x, j] for 4 rows r and ncols (a multiple of 16) columns j.
AF_INLINE void abt_rows4(const float* __restrict__ A, std::int64_t lda, const float* __restrict__ Bt,
                         std::int64_t ldb, std::int64_t K, std::int64_t ncols, float* __restrict__ C,
                         std::int64_t ldc) {
  std::int64_t j = 0;
  for (; j + 2 * W <= ncols; j += 2 * W) {
    vf c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
    for (std::int64_t x = 0; x < K; ++x) {
      const vf b0 = loadv(Bt + x * ldb + j);
      const vf b1 = loadv(Bt + x * ldb + j + W);
      const float a0 = A[x], a1 = A[lda + x], a2 = A[2 * lda + x], a3 = A[3 * lda + x];
      c00 += a0 * b0; c01 += a0 * b1;
      c10 += a1 * b0; c11 += a1 * b1;
      c20 += a2 * b0; c21 += a2 * b1;
      c30 += a3 * b0; c31 += a3 * b1;
    }
    storev(C + j, c00); storev(C + j + W, c01);
    storev(C + ldc + j, c10); storev(C + ldc + j + W, c11);
    storev(C + 2 * ldc + j, c20); storev(C + 2 * ldc + j + W, c21);
    storev(C + 3 * ldc + j, c30); storev(C + 3 * ldc + j + W, c31);
  }
  for (; j < ncols; j += W) {
    vf c0 = {}, c1 = {}, c2 = {}, c3 = {};
    for (std::int64_t x = 0; x < K; ++x) {
      const vf b0 = loadv(Bt + x * ldb + j);
      c0 += A[x] * b0; c1 += A[lda + x] * b0; c2 += A[2 * lda + x] * b0; c3 += A[3 * lda + x] * b0;
    }
    storev(C + j, c0); storev(C + ldc + j, c1); storev(C + 2 * ldc + j, c2); storev(C + 3 * ldc + j, c3);
  }
}

// C[r, c] = rs[r] * sum_{x < n} A[r, x] * B[x, c] for 4 rows r and the 16*NV columns c at C, B.
template <int NV>
AF_INLINE void ab_rows4(const float* __restrict__ A, std::int64_t lda, const float* __restrict__ B,
                        std::int64_t ldb, std::int64_t n, float* __restrict__ C, std::int64_t ldc,
                        const float* rs) {
  vf acc[RB][NV];
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = vf{};
  for (std::int64_t x = 0; x < n; ++x) {
    vf b[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) b[c] = loadv(B + x * ldb + c * W);
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const float a = A[r * lda + x];
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] += a * b[c];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r) {
    const float s = rs ? rs[r] : 1.0f;
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) storev(C + r * ldc + c * W, acc[r][c] * s);
  }
}

// ab_rows4 over all hd columns, in chunks of up to 64; B's rows are ldb apart, C's hd apart.
AF_INLINE void ab_rows4_all(const float* A, std::int64_t lda, const float* B, std::int64_t ldb,
                            std::int64_t hd, std::int64_t n, float* C, const float* rs) {
  for (std::int64_t d0 = 0; d0 < hd; d0 += 4 * W) {
    switch ((hd - d0) >= 4 * W ? 4 : (hd - d0) / W) {
      case 4: ab_rows4<4>(A, lda, B + d0, ldb, n, C + d0, hd, rs); break;
      case 3: ab_rows4<3>(A, lda, B + d0, ldb, n, C + d0, hd, rs); break;
      case 2: ab_rows4<2>(A, lda, B + d0, ldb, n, C + d0, hd, rs); break;
      default: ab_rows4<1>(A, lda, B + d0, ldb, n, C + d0, hd, rs); break;
    }
  }
}

// One (b, h) slice of q, k or v: its first row and the distance between rows.
struct Rows {
  const float* p;
  std::int64_t ld;
  const float* row(std::int64_t i) const { return p + i * ld; }
};

Rows rows_of(const float* base, const std::int64_t* strides, std::int64_t b, std::int64_t h) {
  return Rows{base + b * strides[0] + h * strides[1], strides[2]};
}

// n rows of hd floats into a dense buffer, then zero rows up to n_padded.
void gather_rows(Rows src, std::int64_t n, std::int64_t n_padded, std::int64_t hd, float* dst) {
  for (std::int64_t i = 0; i < n; ++i)
    std::memcpy(dst + i * hd, src.row(i), static_cast<std::size_t>(hd) * sizeof(float));
  std::memset(dst + n * hd, 0, static_cast<std::size_t>((n_padded - n) * hd) * sizeof(float));
}

std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

// The keys a window's softmax runs over, in order: pos[j] is the position of the j-th one.
// Rule "key": a hidden key's logit is s - 1e9, whose exponential underflows to exactly 0 beside
// any visible key, so only the visible keys are kept: the same non-zero terms in the same order
// (only the grouping of the float sums changes), and attention costs what the visible keys cost
// (padding, and the MASK-token observations of pretraining). Every key is kept when all are
// hidden (the row is then a uniform average) and under rule query_or_key_plus1 (+1 hides nothing).
struct KeySet {
  std::int64_t n = 0, np = 0;           // kept keys; n rounded up to the vector width
  const std::int64_t* pos = nullptr;    // [n] their positions
  const std::uint8_t* hidden = nullptr;  // [n] their hidden flags
  bool all = true;                      // every key kept (pos[j] == j)
};

KeySet key_set(const std::uint8_t* hid, std::int64_t L, int rule, std::int64_t* pos,
               std::uint8_t* hidden) {
  KeySet ks;
  ks.pos = pos;
  ks.hidden = hidden;
  if (rule == kRuleKey)
    for (std::int64_t j = 0; j < L; ++j)
      if (hid[j] == 0) {
        pos[ks.n] = j;
        hidden[ks.n++] = 0;
      }
  if (ks.n == 0 || ks.n == L) {  // nothing to leave out
    for (std::int64_t j = 0; j < L; ++j) {
      pos[j] = j;
      hidden[j] = hid[j];
    }
    ks.n = L;
  }
  ks.all = ks.n == L;
  ks.np = round_up(ks.n, W);
  return ks;
}

// dst[d * ks.np + j] = column d of key row ks.pos[j], zero for n <= j < np: K (or V) transposed.
void transpose_keys(Rows src, const KeySet& ks, std::int64_t hd, float* dst) {
  for (std::int64_t d = 0; d < hd; ++d) {
    float* row = dst + d * ks.np;
    for (std::int64_t j = 0; j < ks.n; ++j) row[j] = src.row(ks.pos[j])[d];
    for (std::int64_t j = ks.n; j < ks.np; ++j) row[j] = 0.0f;
  }
}

// The kept key rows, dense, then zero rows up to np.
void gather_keys(Rows src, const KeySet& ks, std::int64_t hd, float* dst) {
  for (std::int64_t j = 0; j < ks.n; ++j)
    std::memcpy(dst + j * hd, src.row(ks.pos[j]), static_cast<std::size_t>(hd) * sizeof(float));
  std::memset(dst + ks.n * hd, 0, static_cast<std::size_t>((ks.np - ks.n) * hd) * sizeof(float));
}

// Rows j < n of src (dense) to rows ks.pos[j] of dst (L rows); the keys left out get zeros (their
// gradients are exactly zero: their probabilities are).
void scatter_keys(const float* src, const KeySet& ks, std::int64_t L, std::int64_t hd, float* dst) {
  const std::size_t row_bytes = static_cast<std::size_t>(hd) * sizeof(float);
  if (ks.all) {
    std::memcpy(dst, src, static_cast<std::size_t>(L) * row_bytes);
    return;
  }
  std::memset(dst, 0, static_cast<std::size_t>(L) * row_bytes);
  for (std::int64_t j = 0; j < ks.n; ++j) std::memcpy(dst + ks.pos[j] * hd, src + j * hd, row_bytes);
}

// Per-key additive terms so that s' = (s + b1[j]) + b2[j] reproduces the reference in float32
// (see the header) for the L keys given (a KeySet's); columns L .. Lp-1 get -inf, i.e.
// probability 0. For rule
// query_or_key_plus1, b1q is the row used by hidden queries (+1 on every real key).
void key_terms(const std::uint8_t* hid, std::int64_t L, std::int64_t Lp, int rule, float* b1,
               float* b2, float* b1q) {
  bool all_hidden = true;
  for (std::int64_t j = 0; j < L; ++j) all_hidden = all_hidden && hid[j] != 0;
  const float ninf = -std::numeric_limits<float>::infinity();
  for (std::int64_t j = 0; j < Lp; ++j) {
    const bool h = j < L && hid[j] != 0;
    if (j >= L) {
      b1[j] = ninf;
      b2[j] = 0.0f;
      b1q[j] = ninf;
    } else if (rule == kRuleKey) {
      b1[j] = h ? -1e9f : 0.0f;
      b2[j] = (h && all_hidden) ? 1e9f : 0.0f;
      b1q[j] = b1[j];
    } else {
      b1[j] = h ? 1.0f : 0.0f;
      b2[j] = 0.0f;
      b1q[j] = 1.0f;
    }
  }
}

struct Scratch {
  std::vector<float> kt, vt, kb, qb, dob, sb, ds, tb, ob, b1, b2, b1q, rowv;
  std::vector<std::int64_t> pos;
  std::vector<std::uint8_t> hidden;
  // Forward: the (b, h) whose kept keys, K^T (kt), V rows (kb) and mask terms are in the buffers
  // above, so that consecutive query blocks of one (b, h) prepare them once.
  std::int64_t keys_of = -1;
  KeySet ks;
};

void ensure(std::vector<float>& v, std::int64_t n) {
  if (static_cast<std::int64_t>(v.size()) < n) v.assign(static_cast<std::size_t>(n), 0.0f);
}

// x[r*ld + j] = scaled logits with the mask terms; returns the row maximum.
AF_INLINE float biased_row(float* __restrict__ s, const float* __restrict__ b1,
                           const float* __restrict__ b2, std::int64_t Lp, float scale) {
  vf m = splat(-std::numeric_limits<float>::infinity());
  for (std::int64_t j = 0; j < Lp; j += W) {
    const vf x = (loadv(s + j) * scale + loadv(b1 + j)) + loadv(b2 + j);
    storev(s + j, x);
    m = x > m ? x : m;
  }
  return hmax(m);
}

// out/lse for queries [q0, q1) of one (b, h).
ASTROMER_FAST_CLONES_V4
void forward_task(const MaskedAttentionArgs& a, std::int64_t bh, std::int64_t q0, std::int64_t q1,
                  Scratch& sc) {
  const std::int64_t L = a.length, hd = a.head_dim;
  const std::int64_t b = bh / a.heads, h = bh % a.heads;
  const Rows q = rows_of(a.q, a.q_strides, b, h);
  const Rows k = rows_of(a.k, a.k_strides, b, h);
  const Rows v = rows_of(a.v, a.v_strides, b, h);
  const std::uint8_t* hid = a.key_hidden + b * L;
  float* kt = sc.kt.data();
  float* vb = sc.kb.data();
  float* qb = sc.qb.data();
  float* sb = sc.sb.data();
  float* ob = sc.ob.data();
  float* b1 = sc.b1.data();
  float* b2 = sc.b2.data();
  float* b1q = sc.b1q.data();
  float* rinv = sc.rowv.data();

  if (sc.keys_of != bh) {
    sc.ks = key_set(hid, L, a.rule, sc.pos.data(), sc.hidden.data());
    key_terms(sc.ks.hidden, sc.ks.n, sc.ks.np, a.rule, b1, b2, b1q);
    transpose_keys(k, sc.ks, hd, kt);
    gather_keys(v, sc.ks, hd, vb);
    sc.keys_of = bh;
  }
  const KeySet& ks = sc.ks;
  const std::int64_t Np = ks.np;  // columns of the logits: the kept keys
  const std::int64_t nr = q1 - q0, nrp = round_up(nr, RB);
  gather_rows(Rows{q.row(q0), q.ld}, nr, nrp, hd, qb);

  for (std::int64_t r0 = 0; r0 < nrp; r0 += RB)
    abt_rows4(qb + r0 * hd, hd, kt, Np, hd, Np, sb + r0 * Np, Np);

  for (std::int64_t r = 0; r < nrp; ++r) {
    float* s = sb + r * Np;
    if (r >= nr) {
      std::memset(s, 0, static_cast<std::size_t>(Np) * sizeof(float));
      rinv[r] = 0.0f;
      continue;
    }
    const std::int64_t i = q0 + r;
    const bool qh = a.rule == kRuleQueryOrKeyPlus1 && hid[i] != 0;
    const float mx = biased_row(s, qh ? b1q : b1, b2, Np, a.scale);
    vf acc = {};
    for (std::int64_t j = 0; j < Np; j += W) {
      const vf p = vexp(loadv(s + j) - mx);
      storev(s + j, p);
      acc += p;
    }
    const float l = hsum(acc);  // >= 1: the maximum contributes exp(0)
    a.lse[bh * L + i] = mx + std::log(l);
    rinv[r] = 1.0f / l;
  }

  for (std::int64_t r0 = 0; r0 < nrp; r0 += RB)
    ab_rows4_all(sb + r0 * Np, Np, vb, hd, hd, ks.n, ob + r0 * hd, rinv + r0);
  std::memcpy(a.out + (bh * L + q0) * hd, ob, static_cast<std::size_t>(nr * hd) * sizeof(float));
}

// dst (cols x rows) = src (rows x cols) transposed; both multiples of 16, and 16x16 tiles keep
// both sides in cache lines.
void transpose(const float* __restrict__ src, float* __restrict__ dst, std::int64_t rows,
               std::int64_t cols) {
  for (std::int64_t i0 = 0; i0 < rows; i0 += W)
    for (std::int64_t j0 = 0; j0 < cols; j0 += W)
      for (std::int64_t i = i0; i < i0 + W; ++i)
        for (std::int64_t j = j0; j < j0 + W; ++j) dst[j * rows + i] = src[i * cols + j];
}

// dq, dk, dv of one (b, h).
ASTROMER_FAST_CLONES_V4
void backward_task(const MaskedAttentionBackwardArgs& g, std::int64_t bh, Scratch& sc) {
  const MaskedAttentionArgs& a = g.fwd;
  const std::int64_t L = a.length, hd = a.head_dim, Lp = round_up(L, W);
  const std::int64_t b = bh / a.heads, h = bh % a.heads;
  const std::int64_t off = bh * L * hd;
  const Rows q = rows_of(a.q, a.q_strides, b, h);
  const Rows k = rows_of(a.k, a.k_strides, b, h);
  const Rows v = rows_of(a.v, a.v_strides, b, h);
  const float* o = a.out + off;
  const float* dout = g.dout + off;
  const float* lse = a.lse + bh * L;
  const std::uint8_t* hid = a.key_hidden + b * L;
  float* kt = sc.kt.data();
  float* vt = sc.vt.data();
  float* kb = sc.kb.data();
  float* qb = sc.qb.data();
  float* dob = sc.dob.data();
  float* P = sc.sb.data();
  float* dS = sc.ds.data();
  float* T = sc.tb.data();
  float* ob = sc.ob.data();
  float* b1 = sc.b1.data();
  float* b2 = sc.b2.data();
  float* b1q = sc.b1q.data();
  float* Dv = sc.rowv.data();

  // P and dS are (Lp queries) x (Np kept keys); see key_set.
  const KeySet ks = key_set(hid, L, a.rule, sc.pos.data(), sc.hidden.data());
  const std::int64_t Np = ks.np;
  key_terms(ks.hidden, ks.n, Np, a.rule, b1, b2, b1q);
  transpose_keys(k, ks, hd, kt);
  transpose_keys(v, ks, hd, vt);
  gather_keys(k, ks, hd, kb);
  gather_rows(q, L, Lp, hd, qb);
  gather_rows(Rows{dout, hd}, L, Lp, hd, dob);
  for (std::int64_t i = 0; i < Lp; ++i) {
    float d = 0.0f;
    if (i < L)
      for (std::int64_t c = 0; c < hd; ++c) d += dout[i * hd + c] * o[i * hd + c];
    Dv[i] = d;
  }

  // P = exp(s' - lse) and dP = dO V^T, then dS = scale * P * (dP - D).
  for (std::int64_t r0 = 0; r0 < Lp; r0 += RB) {
    abt_rows4(qb + r0 * hd, hd, kt, Np, hd, Np, P + r0 * Np, Np);
    abt_rows4(dob + r0 * hd, hd, vt, Np, hd, Np, dS + r0 * Np, Np);
  }
  for (std::int64_t i = 0; i < Lp; ++i) {
    float* p = P + i * Np;
    float* ds = dS + i * Np;
    if (i >= L) {
      std::memset(p, 0, static_cast<std::size_t>(Np) * sizeof(float));
      std::memset(ds, 0, static_cast<std::size_t>(Np) * sizeof(float));
      continue;
    }
    const bool qh = a.rule == kRuleQueryOrKeyPlus1 && hid[i] != 0;
    const float* bb1 = qh ? b1q : b1;
    const float li = lse[i], di = Dv[i];
    for (std::int64_t j = 0; j < Np; j += W) {
      const vf x = (loadv(p + j) * a.scale + loadv(bb1 + j)) + loadv(b2 + j);
      const vf pj = vexp(x - li);
      storev(p + j, pj);
      storev(ds + j, pj * (loadv(ds + j) - di) * a.scale);
    }
  }

  // dq = dS K (over the kept keys)
  for (std::int64_t r0 = 0; r0 < Lp; r0 += RB)
    ab_rows4_all(dS + r0 * Np, Np, kb, hd, hd, ks.n, ob + r0 * hd, nullptr);
  std::memcpy(g.dq + off, ob, static_cast<std::size_t>(L * hd) * sizeof(float));
  // dv = P^T dO and dk = dS^T Q, for the kept keys; the others' are zero.
  transpose(P, T, Lp, Np);
  for (std::int64_t r0 = 0; r0 < Np; r0 += RB)
    ab_rows4_all(T + r0 * Lp, Lp, dob, hd, hd, L, ob + r0 * hd, nullptr);
  scatter_keys(ob, ks, L, hd, g.dv + off);
  transpose(dS, T, Lp, Np);
  for (std::int64_t r0 = 0; r0 < Np; r0 += RB)
    ab_rows4_all(T + r0 * Lp, Lp, qb, hd, hd, L, ob + r0 * hd, nullptr);
  scatter_keys(ob, ks, L, hd, g.dk + off);
}

void validate(const MaskedAttentionArgs& a, const char* what) {
  const std::string w = what;
  if (a.batch < 0 || a.heads < 0 || a.length < 0)
    throw std::invalid_argument(w + ": batch, heads and length must be >= 0");
  if (a.head_dim <= 0 || a.head_dim % W != 0)
    throw std::invalid_argument(w + ": head_dim must be a positive multiple of 16, got " +
                                std::to_string(a.head_dim));
  if (a.rule != kRuleKey && a.rule != kRuleQueryOrKeyPlus1)
    throw std::invalid_argument(w + ": unknown mask rule " + std::to_string(a.rule));
  if (!(std::isfinite(a.scale))) throw std::invalid_argument(w + ": scale must be finite");
  for (const std::int64_t* s : {a.q_strides, a.k_strides, a.v_strides})
    if (s[0] < 0 || s[1] < 0 || s[2] < 0) throw std::invalid_argument(w + ": strides must be >= 0");
  if (a.batch * a.heads * a.length > 0 &&
      (!a.q || !a.k || !a.v || !a.key_hidden || !a.out || !a.lse))
    throw std::invalid_argument(w + ": null data pointer");
}

// Zero strides mean dense (B, H, L, hd).
void fill_dense_strides(MaskedAttentionArgs& a) {
  for (std::int64_t* s : {a.q_strides, a.k_strides, a.v_strides}) {
    if (s[0] == 0 && s[1] == 0 && s[2] == 0) {
      s[0] = a.heads * a.length * a.head_dim;
      s[1] = a.length * a.head_dim;
      s[2] = a.head_dim;
    }
  }
}

}  // namespace

void masked_attention_forward(const MaskedAttentionArgs& args, int num_threads) {
  MaskedAttentionArgs a = args;
  fill_dense_strides(a);
  validate(a, "masked_attention_forward");
  const std::int64_t BH = a.batch * a.heads, L = a.length;
  if (BH == 0 || L == 0) return;
  const std::int64_t nqb = (L + QB - 1) / QB, Lp = round_up(L, W), hd = a.head_dim;
  parallel_for(BH * nqb, 1, num_threads, [&](std::int64_t t0, std::int64_t t1) {
    Scratch sc;
    ensure(sc.kt, hd * Lp);
    ensure(sc.kb, Lp * hd);
    sc.pos.resize(static_cast<std::size_t>(L));
    sc.hidden.resize(static_cast<std::size_t>(L));
    ensure(sc.qb, QB * hd);
    ensure(sc.sb, QB * Lp);
    ensure(sc.ob, QB * hd);
    ensure(sc.b1, Lp);
    ensure(sc.b2, Lp);
    ensure(sc.b1q, Lp);
    ensure(sc.rowv, QB);
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t bh = t / nqb, qb = t % nqb;
      forward_task(a, bh, qb * QB, std::min(L, (qb + 1) * QB), sc);
    }
  });
}

void masked_attention_backward(const MaskedAttentionBackwardArgs& args, int num_threads) {
  MaskedAttentionBackwardArgs g = args;
  fill_dense_strides(g.fwd);
  validate(g.fwd, "masked_attention_backward");
  const MaskedAttentionArgs& a = g.fwd;
  const std::int64_t BH = a.batch * a.heads, L = a.length;
  if (BH == 0 || L == 0) return;
  if (!g.dout || !g.dq || !g.dk || !g.dv)
    throw std::invalid_argument("masked_attention_backward: null gradient pointer");
  const std::int64_t Lp = round_up(L, W), hd = a.head_dim;
  parallel_for(BH, 1, num_threads, [&](std::int64_t t0, std::int64_t t1) {
    Scratch sc;
    ensure(sc.kt, hd * Lp);
    ensure(sc.vt, hd * Lp);
    ensure(sc.kb, Lp * hd);
    sc.pos.resize(static_cast<std::size_t>(L));
    sc.hidden.resize(static_cast<std::size_t>(L));
    ensure(sc.qb, Lp * hd);
    ensure(sc.dob, Lp * hd);
    ensure(sc.ob, Lp * hd);
    ensure(sc.sb, Lp * Lp);
    ensure(sc.ds, Lp * Lp);
    ensure(sc.tb, Lp * Lp);
    ensure(sc.b1, Lp);
    ensure(sc.b2, Lp);
    ensure(sc.b1q, Lp);
    ensure(sc.rowv, Lp);
    for (std::int64_t t = t0; t < t1; ++t) backward_task(g, t, sc);
  });
}

}  // namespace cpu
}  // namespace astromer_fast
