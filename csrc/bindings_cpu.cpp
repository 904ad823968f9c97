// Python glue for the CPU kernels. Tensors cross the boundary as raw addresses (Python ints from
// Tensor.data_ptr()), so this module links neither libtorch nor its headers; shape, dtype and
// device checks live on the Python side (astromer_fast/kernels/input_embedding.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <thread>
#include <vector>

#include "bindings_common.h"
#include "cpu/input_embedding.h"
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
                             int num_threads) {
  const auto a = input_embedding_args<cpu::InputEmbeddingArgs>(t, m, hidden, w, b, token, base,
                                                               rows, dim, out);
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

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "astromer_fast CPU kernels (raw-pointer interface, no libtorch)";
  // std::invalid_argument becomes ValueError through pybind11's default translator.
  mod.def("input_embedding_forward", &input_embedding_forward,
          "out[r, j] = PE_j(t[r]) + m'[r] * w[j] + b[j] on float32 host buffers; 0 = null pointer.",
          py::arg("t"), py::arg("m"), py::arg("hidden"), py::arg("w"), py::arg("b"),
          py::arg("token"), py::arg("base"), py::arg("rows"), py::arg("dim"), py::arg("out"),
          py::arg("num_threads") = 1, py::call_guard<py::gil_scoped_release>());
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
