// The checks every entry point makes on its params before a kernel reads them, shared by
// the CPU (csrc/cpu/dispatch.cpp) and CUDA (csrc/cuda/api.cu) entry points: the core is
// safe to call without the Python layer's checks. A violation throws
// std::invalid_argument naming the field and what was expected; the pybind11 bindings
// turn it into ValueError. What only one backend can do (the CPU's dtypes, CUDA's shared
// memory limits) is checked there.
//
// Header-only so that every build of the kernels (the package, tools/cuda_emulation)
// gets it without a source list. Not to be included by csrc/cpu/avx2.cpp (see kernels.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "bspf/params.h"

namespace bspf {

// Which entry point's params: the mask writes only the mask words.
enum class Entry { kMask, kForward };

namespace validation {

[[noreturn]] inline void fail(const std::string& what) { throw std::invalid_argument("bspf: " + what); }

inline void require(const void* pointer, const char* name) {
  if (pointer == nullptr) fail(std::string(name) + " is null");
}

inline void require_strides(const int64_t (&stride)[4], const char* name) {
  for (int k = 0; k < 4; ++k)
    if (stride[k] < 0)
      fail(std::string(name) + "[" + std::to_string(k) + "] must be >= 0, got " + std::to_string(stride[k]));
}

inline void require_saved(const Saved& saved) {
  require(saved.mask_words, "saved.mask_words");
  require(saved.match, "saved.match");
  require(saved.rho, "saved.rho");
  require(saved.lse, "saved.lse");
  require(saved.log_row_sum, "saved.log_row_sum");
}

inline void require_at_least(int64_t value, int64_t low, const char* name) {
  if (value < low) fail(std::string(name) + " must be >= " + std::to_string(low) + ", got " + std::to_string(value));
}

// a · b, or fail when it overflows int64.
inline int64_t product(int64_t a, int64_t b, const char* what) {
  int64_t out = 0;
  if (__builtin_mul_overflow(a, b, &out)) fail(std::string(what) + " overflows int64");
  return out;
}

// A NaN keep ratio fails too.
inline void require_keep_ratio(double keep_ratio) {
  if (!(keep_ratio >= 0.0 && keep_ratio <= 1.0))
    fail("keep_ratio must be in [0, 1], got " + std::to_string(keep_ratio));
}

}  // namespace validation

// Whether the problem is empty (nothing to compute, no pointer is read).
inline bool is_empty(const Problem& p) { return p.batch == 0 || p.heads == 0 || p.seqlen == 0; }

inline void validate(const Problem& p) {
  using namespace validation;
  const int32_t dtype = static_cast<int32_t>(p.dtype);
  if (dtype < 0 || dtype > 3) fail("p.dtype must be float32, float64, float16 or bfloat16, got code " + std::to_string(dtype));
  require_at_least(p.batch, 0, "p.batch");
  require_at_least(p.heads, 0, "p.heads");
  require_at_least(p.seqlen, 0, "p.seqlen");
  require_at_least(p.head_dim, 1, "p.head_dim");
  require_at_least(p.value_dim, 0, "p.value_dim");
  if (p.block_size < 1 || p.block_size > kMaxBlockSize)
    fail("p.block_size must be in [1, " + std::to_string(kMaxBlockSize) + "] (one mask word per block row), got " +
         std::to_string(p.block_size));
  if (!std::isfinite(p.scale)) fail("p.scale must be finite, got " + std::to_string(p.scale));
  // Every index a kernel forms is below the largest buffer's element count.
  const int64_t rows = product(product(p.batch, p.heads, "batch · heads"), p.seqlen, "batch · heads · seqlen");
  product(rows, p.head_dim, "the qk element count");
  product(rows, p.value_dim, "the v element count");
  product(rows, p.seqlen, "batch · heads · seqlen²");
}

inline void validate(const ForwardParams& fp, Entry entry) {
  using namespace validation;
  validate(fp.p);
  require_keep_ratio(fp.keep_ratio);
  require_at_least(fp.num_threads, 0, "num_threads");
  require_strides(fp.qk_stride, "qk_stride");
  require_strides(fp.v_stride, "v_stride");
  if (is_empty(fp.p)) return;
  require(fp.qk, "qk");
  require(fp.score_kernel, "score_kernel");
  if (entry == Entry::kMask) {
    require(fp.saved.mask_words, "saved.mask_words");
    return;
  }
  if (fp.p.value_dim > 0) {
    require(fp.v, "v");
    require(fp.out, "out");
  }
  require_saved(fp.saved);
}

inline void validate(const BackwardParams& bp) {
  using namespace validation;
  validate(bp.p);
  require_at_least(bp.num_threads, 0, "num_threads");
  require_strides(bp.grad_out_stride, "grad_out_stride");
  require_strides(bp.qk_stride, "qk_stride");
  require_strides(bp.v_stride, "v_stride");
  if (is_empty(bp.p)) return;
  require(bp.qk, "qk");
  require(bp.grad_qk, "grad_qk");
  if (bp.p.value_dim > 0) {
    require(bp.v, "v");
    require(bp.grad_out, "grad_out");
    require(bp.grad_v, "grad_v");
  }
  require_saved(bp.saved);
}

inline void validate(const ScoreKernelGradParams& sp) {
  using namespace validation;
  validate(sp.p);
  require_keep_ratio(sp.keep_ratio);
  require_at_least(sp.num_threads, 0, "num_threads");
  require_strides(sp.grad_out_stride, "grad_out_stride");
  require_strides(sp.qk_stride, "qk_stride");
  require_strides(sp.v_stride, "v_stride");
  require(sp.grad_score_kernel, "grad_score_kernel");  // written even for an empty problem (zeros)
  if (is_empty(sp.p)) return;
  require(sp.qk, "qk");
  require(sp.score_kernel, "score_kernel");
  if (sp.p.value_dim > 0) {
    require(sp.v, "v");
    require(sp.grad_out, "grad_out");
  }
  require_saved(sp.saved);
}

}  // namespace bspf
