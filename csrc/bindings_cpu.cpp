// Python glue for the CPU kernels. Tensors cross the boundary as raw addresses (Python ints from
// Tensor.data_ptr()), so this module links neither libtorch nor its headers; shape, dtype and
// device checks live on the Python side (astromer_fast/kernels/input_embedding.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bindings_common.h"
#include "cpu/fused_block.h"
#include "cpu/host_windows.h"
#include "cpu/input_embedding.h"
#include "cpu/isa.h"
#include "cpu/masked_attention.h"
#include "cpu/parallel.h"
#include "cpu/weighted_rmse.h"

namespace py = pybind11;

namespace {

namespace cpu = astromer_fast::cpu;
using namespace astromer_fast::bindings;

void input_embedding_forward(std::uintptr_t t, std::uintptr_t m, std::uintptr_t hidden,
                             std::uintptr_t w, std::uintptr_t b, std::uintptr_t token, double base,
                             std::int64_t rows, std::int64_t dim, std::uintptr_t out,
                             int num_threads, std::uintptr_t out_bf16) {
  auto a = input_embedding_args<cpu::InputEmbeddingArgs>(t, m, hidden, w, b, token, base, rows,
                                                         dim, out);
  set_ptr(a.out_bf16, out_bf16);
  cpu::input_embedding_forward(a, num_threads);
}

void weighted_rmse_forward(std::uintptr_t pred, bool pred_bf16, std::uintptr_t target,
                           std::uintptr_t err, std::uintptr_t probed, std::uintptr_t valid,
                           std::int64_t rows, std::int64_t length, std::uintptr_t loss,
                           std::uintptr_t scale, std::uintptr_t dir, int num_threads) {
  const auto a = weighted_rmse_args<cpu::WeightedRmseArgs>(pred, pred_bf16, target, err, probed,
                                                           valid, rows, length, loss, scale, dir);
  cpu::weighted_rmse_forward(a, num_threads);
}

void weighted_rmse_backward(std::uintptr_t dir, double grad_loss, double scale, std::uintptr_t grad,
                            bool grad_bf16, std::int64_t n, int num_threads) {
  cpu::weighted_rmse_backward(as_ptr<const float>(dir), static_cast<float>(grad_loss),
                              static_cast<float>(scale), as_ptr<void>(grad), grad_bf16, n,
                              num_threads);
}

// qkv_strides: empty (dense), or 9 element strides: q, k, v each over (batch, head, row).
void set_qkv_strides(cpu::MaskedAttentionArgs& a, const std::vector<std::int64_t>& s) {
  if (s.empty()) return;
  if (s.size() != 9) throw std::invalid_argument("qkv_strides must hold 9 values (or none)");
  for (int i = 0; i < 3; ++i) {
    a.q_strides[i] = s[i];
    a.k_strides[i] = s[3 + i];
    a.v_strides[i] = s[6 + i];
  }
}

void masked_attention_forward(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                              std::uintptr_t key_hidden, std::int64_t batch, std::int64_t heads,
                              std::int64_t length, std::int64_t head_dim, int rule, double scale,
                              std::uintptr_t out, std::uintptr_t lse, int num_threads,
                              const std::vector<std::int64_t>& qkv_strides) {
  auto a = masked_attention_args<cpu::MaskedAttentionArgs>(
      q, k, v, key_hidden, batch, heads, length, head_dim, rule, scale, out, lse);
  set_qkv_strides(a, qkv_strides);
  cpu::masked_attention_forward(a, num_threads);
}

void masked_attention_backward(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                               std::uintptr_t key_hidden, std::uintptr_t out, std::uintptr_t lse,
                               std::uintptr_t dout, std::int64_t batch, std::int64_t heads,
                               std::int64_t length, std::int64_t head_dim, int rule, double scale,
                               std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv,
                               int num_threads, const std::vector<std::int64_t>& qkv_strides) {
  cpu::MaskedAttentionBackwardArgs g;
  g.fwd = masked_attention_args<cpu::MaskedAttentionArgs>(q, k, v, key_hidden, batch, heads, length,
                                                          head_dim, rule, scale, out, lse);
  set_qkv_strides(g.fwd, qkv_strides);
  set_masked_attention_grads(g, dout, dq, dk, dv);
  cpu::masked_attention_backward(g, num_threads);
}

// ---- fused encoder block (cpu/fused_block.h) ----
cpu::Storage storage_of(bool bf16) {
  return bf16 ? cpu::Storage::kBFloat16 : cpu::Storage::kFloat32;
}

void residual_layernorm(std::uintptr_t x, std::int64_t ld_x, std::uintptr_t bias_x,
                        std::uintptr_t res, std::int64_t ld_res, std::uintptr_t bias_res,
                        std::uintptr_t gamma, std::uintptr_t beta, double eps, std::int64_t rows,
                        std::int64_t dim, bool bf16, std::uintptr_t out, std::int64_t ld_out,
                        std::uintptr_t valid, std::int64_t window_rows, std::uintptr_t pooled,
                        std::int64_t ld_pooled, int num_threads, double dropout_keep,
                        std::uint64_t dropout_seed, std::uintptr_t xhat, std::uintptr_t rstd,
                        std::uintptr_t row_offsets, std::int64_t windows) {
  cpu::ResidualLayerNormArgs a;
  set_ptr(a.x, x);
  a.ld_x = ld_x;
  set_ptr(a.bias_x, bias_x);
  set_ptr(a.res, res);
  a.ld_res = ld_res;
  set_ptr(a.bias_res, bias_res);
  set_ptr(a.gamma, gamma);
  set_ptr(a.beta, beta);
  a.eps = static_cast<float>(eps);
  a.rows = rows;
  a.dim = dim;
  a.storage = storage_of(bf16);
  set_ptr(a.out, out);
  a.ld_out = ld_out;
  set_ptr(a.valid, valid);
  a.window_rows = window_rows;
  set_ptr(a.pooled, pooled);
  a.ld_pooled = ld_pooled;
  a.dropout_keep = static_cast<float>(dropout_keep);
  a.dropout_seed = dropout_seed;
  set_ptr(a.xhat, xhat);
  set_ptr(a.rstd, rstd);
  set_ptr(a.row_offsets, row_offsets);
  a.windows = windows;
  cpu::residual_layernorm(a, num_threads);
}

void residual_layernorm_backward(std::uintptr_t dy, std::int64_t ld_dy, std::uintptr_t xhat,
                                 std::uintptr_t rstd, std::uintptr_t gamma, std::int64_t rows,
                                 std::int64_t dim, bool bf16, double dropout_keep,
                                 std::uint64_t dropout_seed, std::uintptr_t d_x,
                                 std::int64_t ld_dx, std::uintptr_t d_res, std::int64_t ld_dres,
                                 std::uintptr_t partials, int num_threads) {
  cpu::ResidualLayerNormBackwardArgs a;
  set_ptr(a.dy, dy);
  a.ld_dy = ld_dy;
  set_ptr(a.xhat, xhat);
  set_ptr(a.rstd, rstd);
  set_ptr(a.gamma, gamma);
  a.rows = rows;
  a.dim = dim;
  a.storage = storage_of(bf16);
  a.dropout_keep = static_cast<float>(dropout_keep);
  a.dropout_seed = dropout_seed;
  set_ptr(a.d_x, d_x);
  a.ld_dx = ld_dx;
  set_ptr(a.d_res, d_res);
  a.ld_dres = ld_dres;
  set_ptr(a.partials, partials);
  cpu::residual_layernorm_backward(a, num_threads);
}

void tanh_backward(std::uintptr_t dy, std::int64_t ld_dy, std::uintptr_t y, std::int64_t ld_y,
                   std::int64_t rows, std::int64_t cols, bool bf16, std::uintptr_t dx,
                   std::int64_t ld_dx, std::uintptr_t partials, int num_threads) {
  cpu::TanhBackwardArgs a;
  set_ptr(a.dy, dy);
  a.ld_dy = ld_dy;
  set_ptr(a.y, y);
  a.ld_y = ld_y;
  a.rows = rows;
  a.cols = cols;
  a.storage = storage_of(bf16);
  set_ptr(a.dx, dx);
  a.ld_dx = ld_dx;
  set_ptr(a.partials, partials);
  cpu::tanh_backward(a, num_threads);
}

void dropout_keep_mask(std::uint64_t seed, double keep, std::int64_t rows, std::int64_t cols,
                       std::uintptr_t out) {
  cpu::dropout_keep_mask(seed, static_cast<float>(keep), rows, cols, as_ptr<std::uint8_t>(out));
}

void bias_tanh(std::uintptr_t x, std::int64_t ld_x, std::uintptr_t bias, std::int64_t rows,
               std::int64_t cols, bool bf16, std::uintptr_t out, std::int64_t ld_out,
               int num_threads) {
  cpu::BiasTanhArgs a;
  set_ptr(a.x, x);
  a.ld_x = ld_x;
  set_ptr(a.bias, bias);
  a.rows = rows;
  a.cols = cols;
  a.storage = storage_of(bf16);
  set_ptr(a.out, out);
  a.ld_out = ld_out;
  cpu::bias_tanh(a, num_threads);
}

void block_attention(std::uintptr_t qkv, std::int64_t ld_qkv, std::uintptr_t bias,
                     std::uintptr_t hidden, std::int64_t batch, std::int64_t length,
                     std::int64_t heads, std::int64_t head_dim, int rule, double scale,
                     bool skip_hidden_queries, bool bf16, std::uintptr_t out, std::int64_t ld_out,
                     int num_threads, std::uintptr_t lse, std::uintptr_t row_offsets) {
  cpu::BlockAttentionArgs a;
  set_ptr(a.qkv, qkv);
  a.ld_qkv = ld_qkv;
  set_ptr(a.bias, bias);
  set_ptr(a.hidden, hidden);
  a.batch = batch;
  a.length = length;
  a.heads = heads;
  a.head_dim = head_dim;
  a.rule = rule;
  a.scale = static_cast<float>(scale);
  a.skip_hidden_queries = skip_hidden_queries;
  a.storage = storage_of(bf16);
  set_ptr(a.out, out);
  a.ld_out = ld_out;
  set_ptr(a.lse, lse);
  set_ptr(a.row_offsets, row_offsets);
  cpu::block_attention(a, num_threads);
}

void block_attention_backward(std::uintptr_t qkv, std::int64_t ld_qkv, std::uintptr_t bias,
                              std::uintptr_t hidden, std::int64_t batch, std::int64_t length,
                              std::int64_t heads, std::int64_t head_dim, int rule, double scale,
                              bool bf16, std::uintptr_t out, std::int64_t ld_out,
                              std::uintptr_t lse, std::uintptr_t dout, std::int64_t ld_dout,
                              std::uintptr_t dqkv, std::int64_t ld_dqkv,
                              std::uintptr_t bias_partials, int num_threads) {
  cpu::BlockAttentionBackwardArgs g;
  cpu::BlockAttentionArgs& a = g.fwd;
  set_ptr(a.qkv, qkv);
  a.ld_qkv = ld_qkv;
  set_ptr(a.bias, bias);
  set_ptr(a.hidden, hidden);
  a.batch = batch;
  a.length = length;
  a.heads = heads;
  a.head_dim = head_dim;
  a.rule = rule;
  a.scale = static_cast<float>(scale);
  a.storage = storage_of(bf16);
  set_ptr(a.out, out);
  a.ld_out = ld_out;
  set_ptr(a.lse, lse);
  set_ptr(g.dout, dout);
  g.ld_dout = ld_dout;
  set_ptr(g.dqkv, dqkv);
  g.ld_dqkv = ld_dqkv;
  set_ptr(g.bias_partials, bias_partials);
  cpu::block_attention_backward(g, num_threads);
}

py::dict cpu_isa_info() {
  const cpu::CpuFeatures& f = cpu::cpu_features();
  py::dict d;
  d["model"] = f.model;
  d["detected"] = cpu::isa_name(cpu::detected_isa());
  d["active"] = cpu::isa_name(cpu::active_isa());
  py::list feats;
  if (f.avx2_fma) feats.append("avx2");
  if (f.avx512) feats.append("avx512");
  if (f.avx512_bf16) feats.append("avx512_bf16");
  if (f.avx512_vnni) feats.append("avx512_vnni");
  if (f.amx_bf16) feats.append("amx_bf16");
  d["features"] = feats;
  return d;
}

void set_cpu_isa(const std::string& name) { cpu::set_isa_limit(cpu::isa_from_name(name)); }

py::object threading_runtime() {
  const cpu::OpenMPRuntime* rt = cpu::openmp_runtime();
  if (rt == nullptr) return py::none();
  return py::str(rt->path);
}

py::dict build_info() {
  py::dict d;
  d["module"] = "astromer_fast._C";
  d["compiler"] = ASTROMER_FAST_CXX_COMPILER;
  d["build_type"] = ASTROMER_FAST_BUILD_TYPE;
  d["cplusplus"] = static_cast<long>(__cplusplus);
  d["hardware_concurrency"] = std::thread::hardware_concurrency();
  return d;
}


// An observation column as 7 integers: (values, is_f64, offset, valid_bits, parent_bits,
// parent_offset, starts); addresses are 0 when absent.
cpu::ObsColumn obs_column(const std::vector<std::int64_t>& c, const char* name) {
  if (c.size() != 7)
    throw std::invalid_argument(std::string(name) + " must be 7 integers (values, is_f64, offset, "
                                "valid_bits, parent_bits, parent_offset, starts)");
  cpu::ObsColumn col;
  col.values = as_ptr<const void>(static_cast<std::uintptr_t>(c[0]));
  col.is_f64 = c[1] != 0;
  col.offset = c[2];
  col.valid_bits = as_ptr<const std::uint8_t>(static_cast<std::uintptr_t>(c[3]));
  col.parent_bits = as_ptr<const std::uint8_t>(static_cast<std::uintptr_t>(c[4]));
  col.parent_offset = c[5];
  col.starts = as_ptr<const std::int64_t>(static_cast<std::uintptr_t>(c[6]));
  return col;
}

std::int64_t host_clean(std::int64_t n_curves, std::uintptr_t lengths,
                        const std::vector<std::int64_t>& time, const std::vector<std::int64_t>& mag,
                        const std::vector<std::int64_t>& err, double time_limit, double mag_limit,
                        std::int64_t window, std::int64_t min_obs, int mode,
                        std::uintptr_t scratch_offsets, std::uintptr_t clean_time,
                        std::uintptr_t clean_mag, std::uintptr_t n_out, std::uintptr_t nonfinite,
                        std::uintptr_t out_of_range, std::uintptr_t nonpositive_err,
                        std::uintptr_t duplicate_time, std::uintptr_t resorted,
                        std::uintptr_t windows_per_curve) {
  cpu::HostCleanArgs a;
  a.n_curves = n_curves;
  set_ptr(a.lengths, lengths);
  a.time = obs_column(time, "time");
  a.mag = obs_column(mag, "mag");
  a.err = obs_column(err, "err");
  a.time_limit = time_limit;
  a.mag_limit = mag_limit;
  a.window = window;
  a.min_obs = min_obs;
  a.mode = mode;
  set_ptr(a.scratch_offsets, scratch_offsets);
  set_ptr(a.clean_time, clean_time);
  set_ptr(a.clean_mag, clean_mag);
  set_ptr(a.n_out, n_out);
  set_ptr(a.nonfinite, nonfinite);
  set_ptr(a.out_of_range, out_of_range);
  set_ptr(a.nonpositive_err, nonpositive_err);
  set_ptr(a.duplicate_time, duplicate_time);
  set_ptr(a.resorted, resorted);
  set_ptr(a.windows_per_curve, windows_per_curve);
  return cpu::host_clean(a);
}

void host_windows(std::int64_t n_curves, std::int64_t window, int mode,
                  std::uintptr_t scratch_offsets, std::uintptr_t clean_time,
                  std::uintptr_t clean_mag, std::uintptr_t n_out, std::uintptr_t windows_per_curve,
                  std::int64_t n_windows, std::uintptr_t t, std::uintptr_t m, std::uintptr_t valid,
                  std::uintptr_t curve, std::uintptr_t n_valid, std::uintptr_t start,
                  std::uintptr_t order) {
  cpu::HostWindowArgs a;
  a.n_curves = n_curves;
  a.window = window;
  a.mode = mode;
  set_ptr(a.scratch_offsets, scratch_offsets);
  set_ptr(a.clean_time, clean_time);
  set_ptr(a.clean_mag, clean_mag);
  set_ptr(a.n_out, n_out);
  set_ptr(a.windows_per_curve, windows_per_curve);
  a.n_windows = n_windows;
  set_ptr(a.t, t);
  set_ptr(a.m, m);
  set_ptr(a.valid, valid);
  set_ptr(a.curve, curve);
  set_ptr(a.n_valid, n_valid);
  set_ptr(a.start, start);
  set_ptr(a.order, order);
  cpu::host_windows(a);
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "astromer_fast CPU kernels (raw-pointer interface, no libtorch)";
  // std::invalid_argument becomes ValueError through pybind11's default translator.
  mod.def("input_embedding_forward", &input_embedding_forward,
          "out[r, j] = PE_j(t[r]) + m'[r] * w[j] + b[j] on float32 host buffers; 0 = null pointer. "
          "With out_bf16 (and out = 0) the result is written as bfloat16 there.",
          py::arg("t"), py::arg("m"), py::arg("hidden"), py::arg("w"), py::arg("b"),
          py::arg("token"), py::arg("base"), py::arg("rows"), py::arg("dim"), py::arg("out"),
          py::arg("num_threads") = 1, py::arg("out_bf16") = 0,
          py::call_guard<py::gil_scoped_release>());
  mod.def("weighted_rmse_forward", &weighted_rmse_forward,
          "Weighted masked RMSE (SPEC.md section 4) of (rows, length) host buffers: writes the loss, "
          "scale = 1/(loss*n_probed_windows) and dir = w p (pred - y) / c (d loss/d pred = dir*scale); "
          "0 = null pointer (err: weights 1; valid: = probed; scale/dir: not wanted).",
          py::arg("pred"), py::arg("pred_bf16"), py::arg("target"), py::arg("err"),
          py::arg("probed"), py::arg("valid"), py::arg("rows"), py::arg("length"), py::arg("loss"),
          py::arg("scale"), py::arg("dir"), py::arg("num_threads") = 1,
          py::call_guard<py::gil_scoped_release>());
  mod.def("weighted_rmse_backward", &weighted_rmse_backward,
          "Backward of weighted_rmse_forward: grad = dir * float32(grad_loss * scale) on n host "
          "floats, written as float32 or (grad_bf16) bfloat16, rounded as torch rounds them.",
          py::arg("dir"), py::arg("grad_loss"), py::arg("scale"), py::arg("grad"),
          py::arg("grad_bf16"), py::arg("n"), py::arg("num_threads") = 1,
          py::call_guard<py::gil_scoped_release>());
  mod.def("masked_attention_forward", &masked_attention_forward,
          "Masked attention (SPEC.md section 3) on float32 (B, H, L, hd) host buffers: writes out "
          "and the log-sum-exp lse (B, H, L). rule 0 = key (-1e9), 1 = query_or_key_plus1 (+1). "
          "qkv_strides: 9 element strides (q, k, v over batch, head, row; rows contiguous), or "
          "empty for dense q, k, v.",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_hidden"), py::arg("batch"),
          py::arg("heads"), py::arg("length"), py::arg("head_dim"), py::arg("rule"),
          py::arg("scale"), py::arg("out"), py::arg("lse"), py::arg("num_threads") = 1,
          py::arg("qkv_strides") = std::vector<std::int64_t>(),
          py::call_guard<py::gil_scoped_release>());
  mod.def("masked_attention_backward", &masked_attention_backward,
          "dq, dk, dv of masked attention from q, k, v, key_hidden, out, lse and dout (float32 "
          "host buffers), recomputing the probabilities from lse; q, k, v strided as in the "
          "forward (qkv_strides), the others dense.",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_hidden"), py::arg("out"),
          py::arg("lse"), py::arg("dout"), py::arg("batch"), py::arg("heads"), py::arg("length"),
          py::arg("head_dim"), py::arg("rule"), py::arg("scale"), py::arg("dq"), py::arg("dk"),
          py::arg("dv"), py::arg("num_threads") = 1,
          py::arg("qkv_strides") = std::vector<std::int64_t>(),
          py::call_guard<py::gil_scoped_release>());
  // The fused encoder block (cpu/fused_block.h); storage float32 or (bf16=True) bfloat16.
  mod.def("residual_layernorm", &residual_layernorm,
          "out = LayerNorm(x + bias_x + res + bias_res) * gamma + beta per row (res, biases: 0 = "
          "none); with pooled, also the window means over valid rows of the float32 result.",
          py::arg("x"), py::arg("ld_x"), py::arg("bias_x"), py::arg("res"), py::arg("ld_res"),
          py::arg("bias_res"), py::arg("gamma"), py::arg("beta"), py::arg("eps"), py::arg("rows"),
          py::arg("dim"), py::arg("bf16"), py::arg("out"), py::arg("ld_out"), py::arg("valid") = 0,
          py::arg("window_rows") = 0, py::arg("pooled") = 0, py::arg("ld_pooled") = 0,
          py::arg("num_threads") = 1, py::arg("dropout_keep") = 1.0, py::arg("dropout_seed") = 0,
          py::arg("xhat") = 0, py::arg("rstd") = 0, py::arg("row_offsets") = 0,
          py::arg("windows") = 0, py::call_guard<py::gil_scoped_release>());
  mod.def("residual_layernorm_backward", &residual_layernorm_backward,
          "Backward of residual_layernorm from dy, xhat and rstd: d_x (dropout applied), d_res, "
          "and per-64-row partial sums [blocks, 4, dim] of d gamma, d beta, d bias_x, d bias_res.",
          py::arg("dy"), py::arg("ld_dy"), py::arg("xhat"), py::arg("rstd"), py::arg("gamma"),
          py::arg("rows"), py::arg("dim"), py::arg("bf16"), py::arg("dropout_keep"),
          py::arg("dropout_seed"), py::arg("d_x"), py::arg("ld_dx"), py::arg("d_res"),
          py::arg("ld_dres"), py::arg("partials"), py::arg("num_threads") = 1,
          py::call_guard<py::gil_scoped_release>());
  mod.def("tanh_backward", &tanh_backward,
          "dx = dy * (1 - y^2) and per-64-row partial sums [blocks, cols] of dx.", py::arg("dy"),
          py::arg("ld_dy"), py::arg("y"), py::arg("ld_y"), py::arg("rows"), py::arg("cols"),
          py::arg("bf16"), py::arg("dx"), py::arg("ld_dx"), py::arg("partials"),
          py::arg("num_threads") = 1, py::call_guard<py::gil_scoped_release>());
  mod.def("dropout_keep_mask", &dropout_keep_mask,
          "The keep mask (uint8 rows x cols) the fused passes apply for (seed, keep).",
          py::arg("seed"), py::arg("keep"), py::arg("rows"), py::arg("cols"), py::arg("out"));
  mod.def("bias_tanh", &bias_tanh, "out = tanh(x + bias) on (rows, cols) strided buffers.",
          py::arg("x"), py::arg("ld_x"), py::arg("bias"), py::arg("rows"), py::arg("cols"),
          py::arg("bf16"), py::arg("out"), py::arg("ld_out"), py::arg("num_threads") = 1,
          py::call_guard<py::gil_scoped_release>());
  mod.def("block_attention", &block_attention,
          "Masked attention of a fused (B*L, >= 3*H*hd) q|k|v projection plus biases, heads side "
          "by side in out (B*L, H*hd); rule 0 = key, 1 = query_or_key_plus1. row_offsets (int64 "
          "[B+1]): packed windows instead of B*L rows with hidden flags (rule key).",
          py::arg("qkv"), py::arg("ld_qkv"), py::arg("bias"), py::arg("hidden"), py::arg("batch"),
          py::arg("length"), py::arg("heads"), py::arg("head_dim"), py::arg("rule"),
          py::arg("scale"), py::arg("skip_hidden_queries"), py::arg("bf16"), py::arg("out"),
          py::arg("ld_out"), py::arg("num_threads") = 1, py::arg("lse") = 0,
          py::arg("row_offsets") = 0, py::call_guard<py::gil_scoped_release>());
  mod.def("block_attention_backward", &block_attention_backward,
          "dq, dk, dv (into dqkv, laid out as qkv) of block_attention from out, lse and dout; "
          "bias_partials [B, 3*H*hd]: per-window sums of dqkv (0 = not wanted).",
          py::arg("qkv"), py::arg("ld_qkv"), py::arg("bias"), py::arg("hidden"), py::arg("batch"),
          py::arg("length"), py::arg("heads"), py::arg("head_dim"), py::arg("rule"),
          py::arg("scale"), py::arg("bf16"), py::arg("out"), py::arg("ld_out"), py::arg("lse"),
          py::arg("dout"), py::arg("ld_dout"), py::arg("dqkv"), py::arg("ld_dqkv"),
          py::arg("bias_partials"), py::arg("num_threads") = 1,
          py::call_guard<py::gil_scoped_release>());
  // The host side of embedding (cpu/host_windows.h): Arrow buffers in, batch buffers out.
  mod.def("host_clean", &host_clean,
          "Clean the light curves of one batch read in place from Arrow buffers into the scratch "
          "buffers; per-curve drop counts and windows. Returns the number of windows.",
          py::arg("n_curves"), py::arg("lengths"), py::arg("time"), py::arg("mag"), py::arg("err"),
          py::arg("time_limit"), py::arg("mag_limit"), py::arg("window"), py::arg("min_obs"),
          py::arg("mode"), py::arg("scratch_offsets"), py::arg("clean_time"),
          py::arg("clean_mag"), py::arg("n_out"), py::arg("nonfinite"), py::arg("out_of_range"),
          py::arg("nonpositive_err"), py::arg("duplicate_time"), py::arg("resorted"),
          py::arg("windows_per_curve"), py::call_guard<py::gil_scoped_release>());
  mod.def("host_windows", &host_windows,
          "Centred, padded windows of the cleaned curves, sorted by decreasing valid count, "
          "written into the batch buffers.",
          py::arg("n_curves"), py::arg("window"), py::arg("mode"), py::arg("scratch_offsets"),
          py::arg("clean_time"), py::arg("clean_mag"), py::arg("n_out"),
          py::arg("windows_per_curve"), py::arg("n_windows"), py::arg("t"), py::arg("m"),
          py::arg("valid"), py::arg("curve"), py::arg("n_valid"), py::arg("start"),
          py::arg("order"), py::call_guard<py::gil_scoped_release>());
  mod.def("cpu_isa_info", &cpu_isa_info,
          "The CPU's model and vector features, and the ISA level the fused-block kernels use.");
  mod.def("set_cpu_isa", &set_cpu_isa,
          "Caps the fused-block kernels' ISA level (baseline, avx2, avx512, avx512_bf16); "
          "ValueError above what the CPU supports.", py::arg("name"));
  // std::runtime_error becomes RuntimeError.
  mod.def("attach_openmp", &cpu::attach_openmp,
          "Run the kernels' worker chunks on the OpenMP runtime that the already-loaded library at "
          "`path` uses (torch's libtorch_cpu: torch's own thread pool); nothing is loaded. Returns "
          "the runtime's file; RuntimeError saying why when there is none.",
          py::arg("path"));
  mod.def("detach_openmp", &cpu::detach_openmp, "Run the kernels' worker chunks on std::thread.");
  mod.def("threading_runtime", &threading_runtime,
          "Path of the attached OpenMP runtime, or None when the kernels use std::thread.");
  mod.def("build_info", &build_info, "Compiler and build settings of this extension.");
}
