// Python glue for the CUDA kernels: raw device addresses and a cudaStream_t as Python ints, no
// libtorch. Compiled by the host compiler; only cuda/input_embedding.h (which has no CUDA
// includes) is seen here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings_common.h"
#include "cuda/input_embedding.h"
#include "cuda/masked_attention.h"
#include "cuda/weighted_rmse.h"

namespace py = pybind11;

namespace {

namespace kcuda = astromer_fast::cuda;
using namespace astromer_fast::bindings;

// The kernels' entry points return nullptr or a static message; the message becomes RuntimeError.
void raise_if_error(const char* err) {
  if (err != nullptr) throw std::runtime_error(std::string("astromer_fast._C_cuda: ") + err);
}

void input_embedding_forward(std::uintptr_t t, std::uintptr_t m, std::uintptr_t hidden,
                             std::uintptr_t w, std::uintptr_t b, std::uintptr_t token, double base,
                             std::int64_t rows, std::int64_t dim, std::uintptr_t out, int device,
                             std::uintptr_t stream) {
  const auto a = input_embedding_args<kcuda::InputEmbeddingArgs>(t, m, hidden, w, b, token, base,
                                                                 rows, dim, out);
  raise_if_error(kcuda::input_embedding_forward(a, device, as_ptr<void>(stream)));
}

void weighted_rmse_forward(std::uintptr_t pred, bool pred_bf16, std::uintptr_t target,
                           std::uintptr_t err, std::uintptr_t probed, std::uintptr_t valid,
                           std::int64_t rows, std::int64_t length, std::uintptr_t workspace,
                           std::uintptr_t loss, std::uintptr_t scale, std::uintptr_t dir,
                           int device, std::uintptr_t stream) {
  auto a = weighted_rmse_args<kcuda::WeightedRmseArgs>(pred, pred_bf16, target, err, probed, valid,
                                                      rows, length, loss, scale, dir);
  set_ptr(a.workspace, workspace);
  raise_if_error(kcuda::weighted_rmse_forward(a, device, as_ptr<void>(stream)));
}

void masked_attention_forward(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                              std::uintptr_t key_hidden, bool bf16, std::int64_t batch,
                              std::int64_t heads, std::int64_t length, std::int64_t head_dim,
                              int rule, double scale, std::uintptr_t out, std::uintptr_t lse,
                              int device, std::uintptr_t stream, bool tensor_cores) {
  auto a = masked_attention_args<kcuda::MaskedAttentionArgs>(q, k, v, key_hidden, batch, heads,
                                                             length, head_dim, rule, scale, out, lse);
  a.bf16 = bf16;
  a.tensor_cores = tensor_cores;
  raise_if_error(kcuda::masked_attention_forward(a, device, as_ptr<void>(stream)));
}

void masked_attention_backward(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                               std::uintptr_t key_hidden, std::uintptr_t out, std::uintptr_t lse,
                               std::uintptr_t dout, bool bf16, std::int64_t batch,
                               std::int64_t heads, std::int64_t length, std::int64_t head_dim,
                               int rule, double scale, std::uintptr_t dq, std::uintptr_t dk,
                               std::uintptr_t dv, std::uintptr_t delta, int device,
                               std::uintptr_t stream, bool tensor_cores) {
  kcuda::MaskedAttentionBackwardArgs g;
  g.fwd = masked_attention_args<kcuda::MaskedAttentionArgs>(q, k, v, key_hidden, batch, heads,
                                                            length, head_dim, rule, scale, out, lse);
  g.fwd.bf16 = bf16;
  g.fwd.tensor_cores = tensor_cores;
  set_masked_attention_grads(g, dout, dq, dk, dv);
  set_ptr(g.delta, delta);
  raise_if_error(kcuda::masked_attention_backward(g, device, as_ptr<void>(stream)));
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
          "tensor_cores=True: bf16 WMMA kernels where supported (bf16, L <= 256, sm_80+), "
          "else the scalar ones. Not yet run on a GPU.",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_hidden"), py::arg("bf16"),
          py::arg("batch"), py::arg("heads"), py::arg("length"), py::arg("head_dim"),
          py::arg("rule"), py::arg("scale"), py::arg("out"), py::arg("lse"), py::arg("device"),
          py::arg("stream"), py::arg("tensor_cores") = false,
          py::call_guard<py::gil_scoped_release>());
  mod.def("masked_attention_backward", &masked_attention_backward,
          "Enqueue dq, dk, dv of masked attention (recomputing P from lse); delta is a float32 "
          "(B, H, L) workspace. tensor_cores as for the forward. Not yet run on a GPU.",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_hidden"), py::arg("out"),
          py::arg("lse"), py::arg("dout"), py::arg("bf16"), py::arg("batch"), py::arg("heads"),
          py::arg("length"), py::arg("head_dim"), py::arg("rule"), py::arg("scale"), py::arg("dq"),
          py::arg("dk"), py::arg("dv"), py::arg("delta"), py::arg("device"), py::arg("stream"),
          py::arg("tensor_cores") = false, py::call_guard<py::gil_scoped_release>());
  mod.def("device_count", &astromer_fast::cuda::cuda_device_count,
          "Number of CUDA devices visible to this module's runtime (0 without a driver).");
  mod.def("build_info", &build_info, "Compiler, CUDA versions and target architectures.");
}
