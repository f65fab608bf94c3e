// The AVX2 path's best matches b(i) and ρ_i within each chunk (SPEC §3.5).
#pragma once

#include <cstdint>

#include "workspace.h"

namespace bspf::cpu::avx2 {

// SPEC §3.5: b(i) and ρ_i within each chunk; the same comparisons as the portable path.
// The chunk's Gram matrix is its diagonal block of L divided by the scale (L = scale · X Xᵀ
// is already computed): equal to the dot products up to one rounding, and exact when the
// scale is a power of two. A zero, tiny, huge or non-finite scale recomputes the dot products.
// The team worker's chunks (for_my_chunks).
void compute_match(const Geometry& g, const float* x, const float* logits, float scale, const Team& team,
                   Workspace& ws, int32_t* match, float* rho);

}  // namespace bspf::cpu::avx2
