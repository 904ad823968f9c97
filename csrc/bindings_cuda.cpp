// Python glue for the CUDA kernels: raw device addresses and a cudaStream_t as Python ints, no
// libtorch. Compiled by the host compiler; only cuda/input_embedding.h (which has no CUDA
// includes) is seen here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/input_embedding.h"
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
  mod.def("device_count", &astromer_fast::cuda::cuda_device_count,
          "Number of CUDA devices visible to this module's runtime (0 without a driver).");
  mod.def("build_info", &build_info, "Compiler, CUDA versions and target architectures.");
}
