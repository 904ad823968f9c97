// Python glue for the CPU kernels. Tensors cross the boundary as raw addresses (Python ints from
// Tensor.data_ptr()), so this module links neither libtorch nor its headers; shape, dtype and
// device checks live on the Python side (astromer_fast/kernels/input_embedding.py).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <thread>

#include "cpu/input_embedding.h"
#include "cpu/weighted_rmse.h"

namespace py = pybind11;

namespace {

template <class T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void input_embedding_forward(std::uintptr_t t, std::uintptr_t m, std::uintptr_t hidden,
                             std::uintptr_t w, std::uintptr_t b, std::uintptr_t token, double base,
                             std::int64_t rows, std::int64_t dim, std::uintptr_t out,
                             int num_threads) {
  astromer_fast::cpu::InputEmbeddingArgs a;
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
  astromer_fast::cpu::input_embedding_forward(a, num_threads);
}

void weighted_rmse_forward(std::uintptr_t pred, bool pred_bf16, std::uintptr_t target,
                           std::uintptr_t err, std::uintptr_t probed, std::uintptr_t valid,
                           std::int64_t rows, std::int64_t length, std::uintptr_t loss,
                           std::uintptr_t scale, std::uintptr_t dir, int num_threads) {
  astromer_fast::cpu::WeightedRmseArgs a;
  a.pred = as_ptr<const void>(pred);
  a.pred_bf16 = pred_bf16;
  a.target = as_ptr<const float>(target);
  a.err = as_ptr<const float>(err);
  a.probed = as_ptr<const std::uint8_t>(probed);
  a.valid = as_ptr<const std::uint8_t>(valid);
  a.rows = rows;
  a.length = length;
  a.loss = as_ptr<float>(loss);
  a.scale = as_ptr<float>(scale);
  a.dir = as_ptr<float>(dir);
  astromer_fast::cpu::weighted_rmse_forward(a, num_threads);
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
  mod.def("build_info", &build_info, "Compiler and build settings of this extension.");
}
