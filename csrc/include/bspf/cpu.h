// CPU entry points. Inputs may have any strides; outputs are contiguous.
#pragma once

#include "bspf/params.h"

namespace bspf::cpu {

// Writes params.saved.mask_words only (the keep mask, for block_mask).
void mask(const ForwardParams& params);

// Writes params.out and every buffer of params.saved.
void forward(const ForwardParams& params);

// Writes params.grad_qk and params.grad_v.
void backward(const BackwardParams& params);

// Writes params.grad_score_kernel: the surrogate gradient of the score kernel
// (docs/spec.md §4a). Portable code for every CPU; the sum over (batch, head) pairs is
// taken in a fixed order, so the result does not depend on the thread count.
void score_kernel_grad(const ScoreKernelGradParams& params);

// Which implementation the dispatcher uses now: "avx2" or "scalar".
const char* capability();

}  // namespace bspf::cpu
