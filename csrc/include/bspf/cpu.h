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

// Which implementation the dispatcher uses now: "avx2" or "scalar".
const char* capability();

}  // namespace bspf::cpu
