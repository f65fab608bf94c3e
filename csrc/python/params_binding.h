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

// Element strides as Python passes them (a tensor's stride(), a tuple of four ints).
using Strides = std::array<int64_t, 4>;

inline void copy_strides(const Strides& from, int64_t (&to)[4]) {
  for (int k = 0; k < 4; ++k) to[k] = from[k];
}

#define BSPF_POINTER_FIELD(cls, Struct, field, Type)                                          \
  cls.def_property(                                                                          \
      #field, [](const Struct& s) { return address(s.field); },                              \
      [](Struct& s, std::uintptr_t a) { s.field = reinterpret_cast<Type>(a); })

#define BSPF_STRIDE_FIELD(cls, Struct, field)                                                 \
  cls.def_property(                                                                          \
      #field,                                                                                \
      [](const Struct& s) { return Strides{s.field[0], s.field[1], s.field[2], s.field[3]}; }, \
      [](Struct& s, const Strides& a) { copy_strides(a, s.field); })

inline void bind_params(py::module_& m) {
  py::enum_<DType>(m, "DType", py::module_local())
      .value("float32", DType::kFloat32)
      .value("float64", DType::kFloat64)
      .value("float16", DType::kFloat16)
      .value("bfloat16", DType::kBFloat16);

  // Besides the default constructors and the fields one by one, constructors that take
  // every field at once: filling a struct field by field costs one Python-to-C++ call per
  // field, and the op's Python layer runs right after the previous call's kernel has taken
  // the caches, where each such call costs microseconds.
  py::class_<Problem>(m, "Problem", py::module_local())
      .def(py::init<>())
      .def(py::init([](DType dtype, int64_t batch, int64_t heads, int64_t seqlen, int64_t head_dim,
                       int64_t value_dim, int32_t block_size, double scale, bool fuse) {
             return Problem{dtype, batch, heads, seqlen, head_dim, value_dim, block_size, scale, fuse};
           }),
           py::arg("dtype"), py::arg("batch"), py::arg("heads"), py::arg("seqlen"), py::arg("head_dim"),
           py::arg("value_dim"), py::arg("block_size"), py::arg("scale"), py::arg("fuse"))
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
  saved.def(py::init<>())
      .def(py::init([](std::uintptr_t mask_words, std::uintptr_t match, std::uintptr_t rho, std::uintptr_t lse,
                       std::uintptr_t log_row_sum) {
             return Saved{reinterpret_cast<uint64_t*>(mask_words), reinterpret_cast<int32_t*>(match),
                          reinterpret_cast<void*>(rho), reinterpret_cast<void*>(lse),
                          reinterpret_cast<void*>(log_row_sum)};
           }),
           py::arg("mask_words"), py::arg("match"), py::arg("rho"), py::arg("lse"), py::arg("log_row_sum"));
  BSPF_POINTER_FIELD(saved, Saved, mask_words, uint64_t*);
  BSPF_POINTER_FIELD(saved, Saved, match, int32_t*);
  BSPF_POINTER_FIELD(saved, Saved, rho, void*);
  BSPF_POINTER_FIELD(saved, Saved, lse, void*);
  BSPF_POINTER_FIELD(saved, Saved, log_row_sum, void*);

  py::class_<ForwardParams> fwd(m, "ForwardParams", py::module_local());
  fwd.def(py::init<>())
      .def(py::init([](const Problem& p, double keep_ratio, std::uintptr_t qk, const Strides& qk_stride,
                       std::uintptr_t v, const Strides& v_stride, std::uintptr_t score_kernel, std::uintptr_t out,
                       const Saved& saved, int32_t num_threads) {
             ForwardParams f;
             f.p = p;
             f.keep_ratio = keep_ratio;
             f.qk = reinterpret_cast<const void*>(qk);
             copy_strides(qk_stride, f.qk_stride);
             f.v = reinterpret_cast<const void*>(v);
             copy_strides(v_stride, f.v_stride);
             f.score_kernel = reinterpret_cast<const void*>(score_kernel);
             f.out = reinterpret_cast<void*>(out);
             f.saved = saved;
             f.num_threads = num_threads;
             return f;
           }),
           py::arg("p"), py::arg("keep_ratio"), py::arg("qk"), py::arg("qk_stride"), py::arg("v"), py::arg("v_stride"),
           py::arg("score_kernel"), py::arg("out"), py::arg("saved"), py::arg("num_threads"))
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
      .def(py::init([](const Problem& p, std::uintptr_t grad_out, const Strides& grad_out_stride, std::uintptr_t qk,
                       const Strides& qk_stride, std::uintptr_t v, const Strides& v_stride, const Saved& saved,
                       std::uintptr_t grad_qk, std::uintptr_t grad_v, int32_t num_threads) {
             BackwardParams b;
             b.p = p;
             b.grad_out = reinterpret_cast<const void*>(grad_out);
             copy_strides(grad_out_stride, b.grad_out_stride);
             b.qk = reinterpret_cast<const void*>(qk);
             copy_strides(qk_stride, b.qk_stride);
             b.v = reinterpret_cast<const void*>(v);
             copy_strides(v_stride, b.v_stride);
             b.saved = saved;
             b.grad_qk = reinterpret_cast<void*>(grad_qk);
             b.grad_v = reinterpret_cast<void*>(grad_v);
             b.num_threads = num_threads;
             return b;
           }),
           py::arg("p"), py::arg("grad_out"), py::arg("grad_out_stride"), py::arg("qk"), py::arg("qk_stride"),
           py::arg("v"), py::arg("v_stride"), py::arg("saved"), py::arg("grad_qk"), py::arg("grad_v"),
           py::arg("num_threads"))
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
