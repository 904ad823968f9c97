#include "cpu/masked_attention.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/attention_keys.h"
#include "cpu/common.h"
#include "cpu/parallel.h"
#include "cpu/vec.h"

namespace astromer_fast {
namespace cpu {
namespace {

constexpr std::int64_t QB = 64;  // query rows per forward task

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
