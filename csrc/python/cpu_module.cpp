// bspf_ext._C: the CPU kernels for Python. Releases the GIL while they run.
#include <pybind11/pybind11.h>

#include "bspf/cpu.h"
#include "params_binding.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "BSPF attention CPU kernels (no torch dependency; pointers come from Python)";
  bspf::python::bind_params(m);
  m.def("mask", &bspf::cpu::mask, py::arg("params"), py::call_guard<py::gil_scoped_release>());
  m.def("forward", &bspf::cpu::forward, py::arg("params"), py::call_guard<py::gil_scoped_release>());
  m.def("backward", &bspf::cpu::backward, py::arg("params"), py::call_guard<py::gil_scoped_release>());
  m.def("score_kernel_grad", &bspf::cpu::score_kernel_grad, py::arg("params"),
        py::call_guard<py::gil_scoped_release>());
  m.def("capability", &bspf::cpu::capability,
        "The CPU path calls take now: 'avx2' or 'scalar' (BSPF_CPU_CAPABILITY forces one).");
}
