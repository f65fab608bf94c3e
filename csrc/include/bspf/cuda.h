// CUDA entry points. Inputs may have any strides; outputs are contiguous. Every
// buffer is allocated by the caller; kernels run on the caller's device (an index) and
// stream (a cudaStream_t cast to uintptr_t, so this header needs no CUDA headers).
// Errors (a failed launch, no device, a problem too large for the kernels) throw:
// std::invalid_argument for an unsupported problem, std::runtime_error for CUDA errors.
#pragma once

#include <cstdint>

#include "bspf/params.h"

namespace bspf::cuda {

// Scratch the CUDA backward needs besides BackwardParams, contiguous, in the accumulation
// type (float, or double for float64 inputs):
//   row_stats    (3, B, H, N): per row δ_i = Σ_k A(i,k)·dA(i,k), s_i = Σ_k P(i,k)·dP(i,k), dρ_i
//                (fully written by the backward; need not be initialised).
//   grad_qk_acc  (B, H, N, D) and grad_v_acc (B, H, N, Dv): the gradients before the cast to
//                the input dtype, ZERO-INITIALISED by the caller (the kernels add into them).
//                They may alias params.grad_qk / grad_v when the dtypes agree.
struct BackwardWorkspace {
  void* row_stats = nullptr;
  void* grad_qk_acc = nullptr;
  void* grad_v_acc = nullptr;
};

// Writes params.saved.mask_words only (the keep mask, for block_mask).
void mask(const ForwardParams& params, int32_t device, std::uintptr_t stream);

// Writes params.out and every buffer of params.saved.
void forward(const ForwardParams& params, int32_t device, std::uintptr_t stream);

// Writes params.grad_qk and params.grad_v (and the workspace).
void backward(const BackwardParams& params, const BackwardWorkspace& workspace, int32_t device,
              std::uintptr_t stream);

// Writes params.grad_score_kernel: the surrogate gradient of the score kernel
// (docs/spec.md §4a). `partials` is scratch of (B·H, 9) doubles, each pair's share of dW
// (fully written; may be null for an empty problem); the shares are added in pair order,
// so the result is the same on every run.
void score_kernel_grad(const ScoreKernelGradParams& params, void* partials, int32_t device, std::uintptr_t stream);

// The largest seqlen the kernels accept for this dtype and block size on `device`
// (shared memory per block bounds it: the mask words of one chunk's rows live there).
int64_t max_seqlen(DType dtype, int32_t block_size, int32_t device);

// Shared memory per block the kernels need for this problem (any device).
int64_t shared_bytes(DType dtype, int32_t block_size, int64_t seqlen);

// CUDA versions as 1000·major + 10·minor (13000 is CUDA 13.0), for the driver check in
// Python; neither needs a GPU. driver_version: the newest CUDA the installed driver
// supports, 0 when no driver is installed. runtime_version: the CUDA runtime linked into
// this module (statically), i.e. the toolkit it was built with.
int32_t driver_version();
int32_t runtime_version();

}  // namespace bspf::cuda
