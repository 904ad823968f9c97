// Python glue for the CUDA kernels: raw device addresses and a cudaStream_t as Python ints, no
// libtorch. Compiled by the host compiler; only cuda/input_embedding.h (which has no CUDA
// includes) is seen here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/input_embedding.h"
#include "cuda/masked_attention.h"
#include "cuda/weighted_rmse.h"

namespace py = pybind11;

namespace {

template <class T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void input_embedding_forward(std::uintptr_t t, std::uintptr_t m, std::uintptr_t hidden,
                             std::uintptr_t w, std::uintptr_t b, std::uintptr_t token, double base,
                             std::int64_t rows, std::int64_t dim, std::uintptr_t out, int device,
                             std::uintptr_t stream) {
  astromer_fast::cuda::InputEmbeddingArgs a;
  a.t = as_ptr<const float>(t);
  a.m = as_ptr<const float>(m);
  a.hidden = as_ptr<const std::uint8_t>(hidden);
  a.w = as_ptr<const float>(w);
  a.b = as_ptr<const float>(b);
  a.token = as_ptr<const float>(token);
  a.base = base;
  a.rows = rows;
  a.dim = dim;
  a.out = as_ptr<float>(out);
  const char* err = astromer_fast::cuda::input_embedding_forward(a, device, as_ptr<void>(stream));
  if (err != nullptr) throw std::runtime_error(std::string("astromer_fast._C_cuda: ") + err);
}

void weighted_rmse_forward(std::uintptr_t pred, bool pred_bf16, std::uintptr_t target,
                           std::uintptr_t err, std::uintptr_t probed, std::uintptr_t valid,
                           std::int64_t rows, std::int64_t length, std::uintptr_t workspace,
                           std::uintptr_t loss, std::uintptr_t scale, std::uintptr_t dir,
                           int device, std::uintptr_t stream) {
  astromer_fast::cuda::WeightedRmseArgs a;
  a.pred = as_ptr<const void>(pred);
  a.pred_bf16 = pred_bf16;
  a.target = as_ptr<const float>(target);
  a.err = as_ptr<const float>(err);
  a.probed = as_ptr<const std::uint8_t>(probed);
  a.valid = as_ptr<const std::uint8_t>(valid);
  a.rows = rows;
  a.length = length;
  a.workspace = as_ptr<float>(workspace);
  a.loss = as_ptr<float>(loss);
  a.scale = as_ptr<float>(scale);
  a.dir = as_ptr<float>(dir);
  const char* e = astromer_fast::cuda::weighted_rmse_forward(a, device, as_ptr<void>(stream));
  if (e != nullptr) throw std::runtime_error(std::string("astromer_fast._C_cuda: ") + e);
}

void masked_attention_forward(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                              std::uintptr_t key_hidden, bool bf16, std::int64_t batch,
                              std::int64_t heads, std::int64_t length, std::int64_t head_dim,
                              int rule, double scale, std::uintptr_t out, std::uintptr_t lse,
                              int device, std::uintptr_t stream) {
  astromer_fast::cuda::MaskedAttentionArgs a;
  a.q = as_ptr<const void>(q);
  a.k = as_ptr<const void>(k);
  a.v = as_ptr<const void>(v);
  a.key_hidden = as_ptr<const std::uint8_t>(key_hidden);
  a.bf16 = bf16;
  a.batch = batch;
  a.heads = heads;
  a.length = length;
  a.head_dim = head_dim;
  a.rule = rule;
  a.scale = static_cast<float>(scale);
  a.out = as_ptr<void>(out);
  a.lse = as_ptr<float>(lse);
  const char* e = astromer_fast::cuda::masked_attention_forward(a, device, as_ptr<void>(stream));
  if (e != nullptr) throw std::runtime_error(std::string("astromer_fast._C_cuda: ") + e);
}

void masked_attention_backward(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                               std::uintptr_t key_hidden, std::uintptr_t out, std::uintptr_t lse,
                               std::uintptr_t dout, bool bf16, std::int64_t batch,
                               std::int64_t heads, std::int64_t length, std::int64_t head_dim,
                               int rule, double scale, std::uintptr_t dq, std::uintptr_t dk,
                               std::uintptr_t dv, std::uintptr_t delta, int device,
                               std::uintptr_t stream) {
  astromer_fast::cuda::MaskedAttentionBackwardArgs g;
  g.fwd.q = as_ptr<const void>(q);
  g.fwd.k = as_ptr<const void>(k);
  g.fwd.v = as_ptr<const void>(v);
  g.fwd.key_hidden = as_ptr<const std::uint8_t>(key_hidden);
  g.fwd.out = as_ptr<void>(out);
  g.fwd.lse = as_ptr<float>(lse);
  g.fwd.bf16 = bf16;
  g.fwd.batch = batch;
  g.fwd.heads = heads;
  g.fwd.length = length;
  g.fwd.head_dim = head_dim;
  g.fwd.rule = rule;
  g.fwd.scale = static_cast<float>(scale);
  g.dout = as_ptr<const void>(dout);
  g.dq = as_ptr<void>(dq);
  g.dk = as_ptr<void>(dk);
  g.dv = as_ptr<void>(dv);
  g.delta = as_ptr<float>(delta);
  const char* e = astromer_fast::cuda::masked_attention_backward(g, device, as_ptr<void>(stream));
  if (e != nullptr) throw std::runtime_error(std::string("astromer_fast._C_cuda: ") + e);
}

py::dict build_info() {
  namespace k = astromer_fast::cuda;
  py::dict d;
  d["module"] = "astromer_fast._C_cuda";
  d["compiler"] = ASTROMER_FAST_CXX_COMPILER;
  d["cuda_compiler"] = ASTROMER_FAST_CUDA_COMPILER;
  d["cuda_archs"] = ASTROMER_FAST_CUDA_ARCHS;
  d["build_type"] = ASTROMER_FAST_BUILD_TYPE;
  d["cudart_compiled"] = k::cuda_runtime_compiled_version();
  d["cudart_linkage"] = "static";
  // Queried now, not at build time; 0 means unavailable (e.g. no NVIDIA driver on this machine).
  d["cudart_runtime"] = k::cuda_runtime_version();
  d["driver"] = k::cuda_driver_version();
  return d;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, mod) {
  mod.doc() = "astromer_fast CUDA kernels (raw-pointer interface, no libtorch)";
  mod.def("input_embedding_forward", &input_embedding_forward,
          "Enqueue out[r, j] = PE_j(t[r]) + m'[r] * w[j] + b[j] on float32 device buffers on "
          "`stream` (a cudaStream_t as int); 0 = null pointer. Raises RuntimeError with the CUDA "
          "error string if the launch fails.",
          py::arg("t"), py::arg("m"), py::arg("hidden"), py::arg("w"), py::arg("b"),
          py::arg("token"), py::arg("base"), py::arg("rows"), py::arg("dim"), py::arg("out"),
          py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  mod.def("weighted_rmse_forward", &weighted_rmse_forward,
          "Enqueue the weighted masked RMSE (SPEC.md section 4) of (rows, length) device buffers "
          "on `stream`: loss, scale = 1/(loss*n_probed_windows), dir = w p (pred - y) / c; "
          "workspace holds 2*rows floats. 0 = null pointer. Not yet run on a GPU.",
          py::arg("pred"), py::arg("pred_bf16"), py::arg("target"), py::arg("err"),
          py::arg("probed"), py::arg("valid"), py::arg("rows"), py::arg("length"),
          py::arg("workspace"), py::arg("loss"), py::arg("scale"), py::arg("dir"),
          py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  mod.def("masked_attention_forward", &masked_attention_forward,
          "Enqueue masked attention (SPEC.md section 3) on (B, H, L, 64) float32/bfloat16 device "
          "buffers on `stream`: out and float32 lse. rule 0 = key, 1 = query_or_key_plus1. "
          "Not yet run on a GPU.",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_hidden"), py::arg("bf16"),
          py::arg("batch"), py::arg("heads"), py::arg("length"), py::arg("head_dim"),
          py::arg("rule"), py::arg("scale"), py::arg("out"), py::arg("lse"), py::arg("device"),
          py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  mod.def("masked_attention_backward", &masked_attention_backward,
          "Enqueue dq, dk, dv of masked attention (recomputing P from lse); delta is a float32 "
          "(B, H, L) workspace. Not yet run on a GPU.",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_hidden"), py::arg("out"),
          py::arg("lse"), py::arg("dout"), py::arg("bf16"), py::arg("batch"), py::arg("heads"),
          py::arg("length"), py::arg("head_dim"), py::arg("rule"), py::arg("scale"), py::arg("dq"),
          py::arg("dk"), py::arg("dv"), py::arg("delta"), py::arg("device"), py::arg("stream"),
          py::call_guard<py::gil_scoped_release>());
  mod.def("device_count", &astromer_fast::cuda::cuda_device_count,
          "Number of CUDA devices visible to this module's runtime (0 without a driver).");
  mod.def("build_info", &build_info, "Compiler, CUDA versions and target architectures.");
}
