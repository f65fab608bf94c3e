// pybind11 bindings of the POD params structs, shared by the CPU and CUDA modules.
// Pointers cross as plain integers (tensor.data_ptr()); nothing here knows torch.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "bspf/params.h"

namespace bspf::python {

namespace py = pybind11;

template <typename T>
std::uintptr_t address(T* pointer) {
  return reinterpret_cast<std::uintptr_t>(pointer);
}

#define BSPF_POINTER_FIELD(cls, Struct, field, Type)                                          \
  cls.def_property(                                                                          \
      #field, [](const Struct& s) { return address(s.field); },                              \
      [](Struct& s, std::uintptr_t a) { s.field = reinterpret_cast<Type>(a); })

#define BSPF_STRIDE_FIELD(cls, Struct, field)                                                 \
  cls.def_property(                                                                          \
      #field,                                                                                \
      [](const Struct& s) { return std::array<int64_t, 4>{s.field[0], s.field[1], s.field[2], s.field[3]}; }, \
      [](Struct& s, const std::array<int64_t, 4>& a) {                                       \
        for (int k = 0; k < 4; ++k) s.field[k] = a[k];                                       \
      })

inline void bind_params(py::module_& m) {
  py::enum_<DType>(m, "DType", py::module_local())
      .value("float32", DType::kFloat32)
      .value("float64", DType::kFloat64)
      .value("float16", DType::kFloat16)
      .value("bfloat16", DType::kBFloat16);

  py::class_<Problem>(m, "Problem", py::module_local())
      .def(py::init<>())
      .def_readwrite("dtype", &Problem::dtype)
      .def_readwrite("batch", &Problem::batch)
      .def_readwrite("heads", &Problem::heads)
      .def_readwrite("seqlen", &Problem::seqlen)
      .def_readwrite("head_dim", &Problem::head_dim)
      .def_readwrite("value_dim", &Problem::value_dim)
      .def_readwrite("block_size", &Problem::block_size)
      .def_readwrite("scale", &Problem::scale)
      .def_readwrite("fuse", &Problem::fuse);

  py::class_<Saved> saved(m, "Saved", py::module_local());
  saved.def(py::init<>());
  BSPF_POINTER_FIELD(saved, Saved, mask_words, uint64_t*);
  BSPF_POINTER_FIELD(saved, Saved, match, int32_t*);
  BSPF_POINTER_FIELD(saved, Saved, rho, void*);
  BSPF_POINTER_FIELD(saved, Saved, lse, void*);
  BSPF_POINTER_FIELD(saved, Saved, log_row_sum, void*);

  py::class_<ForwardParams> fwd(m, "ForwardParams", py::module_local());
  fwd.def(py::init<>())
      .def_readwrite("p", &ForwardParams::p)
      .def_readwrite("keep_ratio", &ForwardParams::keep_ratio)
      .def_readwrite("saved", &ForwardParams::saved)
      .def_readwrite("num_threads", &ForwardParams::num_threads);
  BSPF_POINTER_FIELD(fwd, ForwardParams, qk, const void*);
  BSPF_POINTER_FIELD(fwd, ForwardParams, v, const void*);
  BSPF_POINTER_FIELD(fwd, ForwardParams, score_kernel, const void*);
  BSPF_POINTER_FIELD(fwd, ForwardParams, out, void*);
  BSPF_STRIDE_FIELD(fwd, ForwardParams, qk_stride);
  BSPF_STRIDE_FIELD(fwd, ForwardParams, v_stride);

  py::class_<BackwardParams> bwd(m, "BackwardParams", py::module_local());
  bwd.def(py::init<>())
      .def_readwrite("p", &BackwardParams::p)
      .def_readwrite("saved", &BackwardParams::saved)
      .def_readwrite("num_threads", &BackwardParams::num_threads);
  BSPF_POINTER_FIELD(bwd, BackwardParams, grad_out, const void*);
  BSPF_POINTER_FIELD(bwd, BackwardParams, qk, const void*);
  BSPF_POINTER_FIELD(bwd, BackwardParams, v, const void*);
  BSPF_POINTER_FIELD(bwd, BackwardParams, grad_qk, void*);
  BSPF_POINTER_FIELD(bwd, BackwardParams, grad_v, void*);
  BSPF_STRIDE_FIELD(bwd, BackwardParams, grad_out_stride);
  BSPF_STRIDE_FIELD(bwd, BackwardParams, qk_stride);
  BSPF_STRIDE_FIELD(bwd, BackwardParams, v_stride);

  py::class_<ScoreKernelGradParams> skg(m, "ScoreKernelGradParams", py::module_local());
  skg.def(py::init<>())
      .def_readwrite("p", &ScoreKernelGradParams::p)
      .def_readwrite("keep_ratio", &ScoreKernelGradParams::keep_ratio)
      .def_readwrite("saved", &ScoreKernelGradParams::saved)
      .def_readwrite("num_threads", &ScoreKernelGradParams::num_threads);
  BSPF_POINTER_FIELD(skg, ScoreKernelGradParams, grad_out, const void*);
  BSPF_POINTER_FIELD(skg, ScoreKernelGradParams, qk, const void*);
  BSPF_POINTER_FIELD(skg, ScoreKernelGradParams, v, const void*);
  BSPF_POINTER_FIELD(skg, ScoreKernelGradParams, score_kernel, const void*);
  BSPF_POINTER_FIELD(skg, ScoreKernelGradParams, grad_score_kernel, void*);
  BSPF_STRIDE_FIELD(skg, ScoreKernelGradParams, grad_out_stride);
  BSPF_STRIDE_FIELD(skg, ScoreKernelGradParams, qk_stride);
  BSPF_STRIDE_FIELD(skg, ScoreKernelGradParams, v_stride);

  m.def("keep_count", &keep_count, py::arg("keep_ratio"), py::arg("rows"), py::arg("cols"));
}

#undef BSPF_POINTER_FIELD
#undef BSPF_STRIDE_FIELD

}  // namespace bspf::python
