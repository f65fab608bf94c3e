// bspf_ext._cuda: the CUDA kernels for Python. Pointers, the device index and the
// stream cross as integers; the structs are the ones bspf_ext._C binds (module-local
// classes, so both modules load side by side). Releases the GIL while launching.
#include <pybind11/pybind11.h>

#include "bspf/cuda.h"
#include "params_binding.h"

namespace py = pybind11;
using bspf::cuda::BackwardWorkspace;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "BSPF attention CUDA kernels (no torch dependency; pointers and streams come from Python)";
  bspf::python::bind_params(m);

  py::class_<BackwardWorkspace> ws(m, "BackwardWorkspace", py::module_local());
  ws.def(py::init<>());
  ws.def_property(
      "row_stats", [](const BackwardWorkspace& w) { return bspf::python::address(w.row_stats); },
      [](BackwardWorkspace& w, std::uintptr_t a) { w.row_stats = reinterpret_cast<void*>(a); });
  ws.def_property(
      "grad_qk_acc", [](const BackwardWorkspace& w) { return bspf::python::address(w.grad_qk_acc); },
      [](BackwardWorkspace& w, std::uintptr_t a) { w.grad_qk_acc = reinterpret_cast<void*>(a); });
  ws.def_property(
      "grad_v_acc", [](const BackwardWorkspace& w) { return bspf::python::address(w.grad_v_acc); },
      [](BackwardWorkspace& w, std::uintptr_t a) { w.grad_v_acc = reinterpret_cast<void*>(a); });

  m.def("mask", &bspf::cuda::mask, py::arg("params"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("forward", &bspf::cuda::forward, py::arg("params"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &bspf::cuda::backward, py::arg("params"), py::arg("workspace"), py::arg("device"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "score_kernel_grad",
      [](const bspf::ScoreKernelGradParams& params, std::uintptr_t partials, int32_t device, std::uintptr_t stream) {
        bspf::cuda::score_kernel_grad(params, reinterpret_cast<void*>(partials), device, stream);
      },
      py::arg("params"), py::arg("partials"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.def("max_seqlen", &bspf::cuda::max_seqlen, py::arg("dtype"), py::arg("block_size"), py::arg("device"),
        "The largest N the kernels accept for this dtype and block size on the device.");
  m.def("shared_bytes", &bspf::cuda::shared_bytes, py::arg("dtype"), py::arg("block_size"), py::arg("seqlen"),
        "Shared memory per block the kernels need for this problem.");
  m.def("driver_version", &bspf::cuda::driver_version,
        "The newest CUDA version the installed driver supports, as 1000*major + 10*minor (0: no driver).");
  m.def("runtime_version", &bspf::cuda::runtime_version,
        "The CUDA runtime version this module was built with and links statically, as 1000*major + 10*minor.");
}
