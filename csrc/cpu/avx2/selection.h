// The AVX2 path's keep mask (SPEC §3.2–3.3): 3×3 scores of each upper block, its k best
// entries by a search on order keys, mirrored to the lower block.
#pragma once

#include <cstdint>

#include "workspace.h"

namespace bspf::cpu::avx2 {

// What select_upper_blocks needs of ws.keys: the order keys of the upper blocks it
// searches side by side, 64 KB (four 64×64 blocks; smaller ones go up to 16 at a time).
constexpr int64_t kSelectionKeys = 4 * 64 * 64;

// SPEC §3.3 for one pair: diagonal blocks full, upper blocks selected, mirrored below, in
// the steps a team shares out: the words of rows [row_begin, row_end) cleared but for their
// diagonal block's, which is full; then, once every row's are, the upper blocks of the
// team worker's row chunks (for_my_chunks) selected (written to their rows, and mirrored to
// their columns' rows).
void clear_mask_words(const Geometry& g, int64_t row_begin, int64_t row_end, uint64_t* words);
void select_upper_blocks(const Geometry& g, const Products& products, const float* logits, const float* score_kernel,
                         const KeepCounts& keep, const Team& team, Workspace& ws, uint64_t* words);

// The scores of one upper block (SPEC §3.2: the 3×3 kernel over its rows × cols logits at
// `block`, row stride ld, zero outside the block) as order keys: an int32 per entry whose
// signed order is the scores' order (-0 as +0, NaN lowest), rows of round_up8(cols) keys,
// round_up8(rows) rows, INT_MIN in the padding. `tile` is scratch of (rows + 2) ·
// (round_up8(cols + 2) + 8) floats. Returns what the k-th score search starts from.
BlockScores score_block(const float* block, int64_t ld, int64_t rows, int64_t cols, const float* score_kernel,
                        float* tile, int32_t* keys);

// The mask words of a searched upper block (rows × cols, keys as score_block lays them
// out) whose kept entries are exactly its keys ≥ threshold (no tie at its k-th key): row
// i's bits to upper[i · stride] and column j's, the mirrored block's row j, to
// lower[j · stride].
void kept_words(const int32_t* keys, int64_t rows, int64_t cols, int32_t threshold, uint64_t* upper, uint64_t* lower,
                int64_t stride);

}  // namespace bspf::cpu::avx2
