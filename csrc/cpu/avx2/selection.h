// The AVX2 path's keep mask (SPEC §3.2–3.3): 3×3 scores of each upper block, its k best
// entries by bisection on order keys, mirrored to the lower block.
#pragma once

#include <cstdint>

#include "workspace.h"

namespace bspf::cpu::avx2 {

// SPEC §3.3 for one pair: diagonal blocks full, upper blocks selected, mirrored below.
void compute_mask_words(const Geometry& g, const float* logits, const float* score_kernel, const KeepCounts& keep,
                        Workspace& ws, uint64_t* words);

}  // namespace bspf::cpu::avx2
