// Plain-old-data descriptions of one BSPF call: raw pointers, sizes and element
// strides. Kernels see only these (no torch, no Python); the Python layer fills them.
#pragma once

#include <cstdint>

namespace bspf {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Sizes shared by every entry point. Tensors are (batch, heads, seqlen, dim).
struct Problem {
  DType dtype = DType::kFloat32;
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t seqlen = 0;
  int64_t head_dim = 0;   // D of qk
  int64_t value_dim = 0;  // Dv of v
  int32_t block_size = 16;
  double scale = 1.0;
  bool fuse = true;

  int64_t num_chunks() const { return (seqlen + block_size - 1) / block_size; }
  int64_t pairs() const { return batch * heads; }
};

// Saved by the forward for the backward, all contiguous, indexed by (b·H + h):
//   mask_words (B, H, N, C): bit j of word (i, c) is M(i, c·Ω + j).
//   match      (B, H, N) int32: b(i), a global token index; i itself when i is alone.
//   rho, lse, log_row_sum (B, H, N) in the accumulation type (double for float64
//   inputs, float otherwise): ρ_i, the log-sum-exp of logit row i, and log Z_i (the
//   log of row i's sum of R = P ⊙ M + F: Z_i itself may underflow, log Z_i does not).
struct Saved {
  uint64_t* mask_words = nullptr;
  int32_t* match = nullptr;
  void* rho = nullptr;
  void* lse = nullptr;
  void* log_row_sum = nullptr;
};

struct ForwardParams {
  Problem p;
  double keep_ratio = 0.5;
  const void* qk = nullptr;
  int64_t qk_stride[4] = {0, 0, 0, 0};
  const void* v = nullptr;
  int64_t v_stride[4] = {0, 0, 0, 0};
  const void* score_kernel = nullptr;  // 3×3 row-major, contiguous, accumulation type
  void* out = nullptr;                 // (B, H, N, Dv) contiguous, input dtype
  Saved saved;
  int32_t num_threads = 1;
};

struct BackwardParams {
  Problem p;
  const void* grad_out = nullptr;
  int64_t grad_out_stride[4] = {0, 0, 0, 0};
  const void* qk = nullptr;
  int64_t qk_stride[4] = {0, 0, 0, 0};
  const void* v = nullptr;
  int64_t v_stride[4] = {0, 0, 0, 0};
  Saved saved;           // read only
  void* grad_qk = nullptr;  // (B, H, N, D) contiguous, input dtype
  void* grad_v = nullptr;   // (B, H, N, Dv) contiguous, input dtype
  int32_t num_threads = 1;
};

// The score kernel's surrogate gradient (docs/spec.md §4a): the backward's inputs, and
// keep_ratio and W, which define each block's relaxation.
struct ScoreKernelGradParams {
  Problem p;
  double keep_ratio = 0.5;
  const void* grad_out = nullptr;
  int64_t grad_out_stride[4] = {0, 0, 0, 0};
  const void* qk = nullptr;
  int64_t qk_stride[4] = {0, 0, 0, 0};
  const void* v = nullptr;
  int64_t v_stride[4] = {0, 0, 0, 0};
  const void* score_kernel = nullptr;  // W: 3×3 row-major, contiguous, accumulation type
  Saved saved;                         // read only
  void* grad_score_kernel = nullptr;   // dW: 3×3 row-major, contiguous, accumulation type
  int32_t num_threads = 1;
};

// One row of a block is one 64-bit mask word (Saved::mask_words).
constexpr int32_t kMaxBlockSize = 64;

// cos(x, y) = x·y / max(‖x‖‖y‖, kCosineEps) (SPEC §3.5).
constexpr double kCosineEps = 1e-8;

// k = ceil(r·rows·cols − 1e-9), evaluated left to right in double (SPEC §3.3).
inline int64_t keep_count(double keep_ratio, int64_t rows, int64_t cols) {
  const double want = keep_ratio * static_cast<double>(rows) * static_cast<double>(cols) - 1e-9;
  int64_t k = static_cast<int64_t>(want);
  if (static_cast<double>(k) < want) ++k;  // ceil without <cmath> rounding-mode surprises
  return k < 0 ? 0 : k;
}

}  // namespace bspf
