// The AVX2 path's probabilities and fusion (SPEC §3.4–3.8): exps under a shift, rows of
// R = P ⊙ M + F with their sums, the masks as per-row bitmaps.
#pragma once

#include <cstdint>

#include "workspace.h"

namespace bspf::cpu::avx2 {

// The backward forms A = R / Z and dR = (…) / Z from P = exp(L − lse) in linear space: exact
// enough while Z_i >= e^-41 (what underflows of P then weighs under 1e-20 of Z_i, and 1 / Z_i
// is far from overflow). A pair with a smaller Z_i goes to the portable path.
constexpr float kSmallestLogRowSum = -41.0f;

// exp(row − shift) in place, 0 in the padding: a row of P from its saved lse (the
// backward), or a forward row with its own maximum (row_shifted_exps).
//
// log P <= 0, but at logits of 1e8 float32's rounding of L and lse can put L above lse
// by tens: the exponent is capped at 0 (a NaN stays NaN: min_ps returns its second
// operand when either is NaN).
void probs_row(const Geometry& g, float* row, float lse);

// A shift no logit exceeds: |L_ij| = |scale · x_i·x_j| ≤ |scale| · max_k ‖x_k‖² = max_k |L_kk|
// (Cauchy–Schwarz), up to a rounding that exp does not mind. Not finite when X is not.
float logit_bound(const Geometry& g, const float* logits);

// The ld×ld square L becomes E = exp(L − shift) in place, 0 in the padding rows and
// columns (one square, not two: at N = 577 each is 1.4 MB of a 2 MB L2). With one shift
// for every row E is symmetric like L: only the upper 8×8 tiles are exponentiated (all
// that is read of L), the lower ones mirrored, so half the exps of a row-by-row softmax,
// and no row maxima. By row bands of 8 (the steps a team shares out): band i0's upper
// tiles, then, once every band's are done, its lower tiles mirrored.
void upper_exps_band(const Geometry& g, const Products& products, float shift, int64_t i0, float* square);
void mirror_exps_band(const Geometry& g, int64_t i0, float* square);

// The row work of the forward that products hold (kernels.h), 8 lanes wide here:
//
// upper_exps: exp(L − shift) in place on the upper 8×8 tiles of rows [row_begin, row_end) of
// the ld×ld square (row i from column i & ~7 on), 0 in the padding rows (i ≥ n) and columns
// (j ≥ n).
void upper_exps(float* square, int64_t ld, int64_t n, float shift, int64_t row_begin, int64_t row_end);
// row_sums: Σ_j row[j] into *total, and the same sum over the columns set in `bitmap` into
// *kept, j in [0, ld).
void row_sums(const float* row, int64_t ld, const uint64_t* bitmap, float* total, float* kept);
// fuse_row: row i moves share · H · source(j) to row b(i) (`target`) on the columns j it
// prunes and b(i) keeps (SPEC §3.7; its own chunk is kept by both rows, so it never moves),
// its mask words `wi` and b(i)'s `wp`, one per chunk. Returns the sum added to `target`.
// source and target may be read up to a vector past a chunk, never past the row's end.
float fuse_row(const ChunkGrid& grid, const uint64_t* wi, const uint64_t* wp, float share, const float* source,
               float* target);
// probs_rows: the backward's P in place of L, rows [row_begin, row_end) of the ld×ld square:
// row i < n becomes exp(min(0, L_i − lse[i])) as probs_row makes it, 0 in the padding
// columns; a row i ≥ n becomes 0.
void probs_rows(float* square, int64_t ld, int64_t n, const float* lse, int64_t row_begin, int64_t row_end);

// A row's mask words as one bit per column, so that 8 columns are one byte.
void row_bitmap(const Geometry& g, const uint64_t* row_words, uint64_t* bitmap);

inline uint32_t bitmap_byte(const uint64_t* bitmap, int64_t j) {  // bits of columns [j, j + 8), j % 8 == 0
  return static_cast<uint32_t>(bitmap[j / 64] >> (j % 64)) & 0xFFu;
}

// The backward's fusion terms of row i (SPEC §4), the transpose of fuse_row: on the
// columns j that row i prunes and b(i) keeps (`wi`, `wp` their mask words),
// grad_i(j) += rho · H · grad_target(j), and returns Σ_j H · probs_i(j) · grad_target(j)
// over them (dρ_i). One chunk at a time, 8 columns per step under the moved bits; other
// entries of grad_i are left as they are, bit for bit.
float fused_grad_row(const ChunkGrid& grid, const uint64_t* wi, const uint64_t* wp, float rho, const float* probs_i,
                     const float* grad_target, float* grad_i);

inline int64_t bitmap_words(const Geometry& g) { return g.ld / 64 + 1; }

// Rows of chunk m of R = P ⊙ M + F (SPEC §3.8) into `weights` (row r = token begin(m) + r),
// for the backward, from P; their sums are not formed (the backward takes Z from the saved
// log Z, as the portable path does). Fusion stays inside the chunk (b(i) is in it).
// `bitmaps` (Ω · bitmap_words(g) words) is left holding the rows' kept columns, row r's at
// bitmaps + r · bitmap_words(g).
void chunk_weights(const Geometry& g, const Products& products, int64_t m, const float* probs, const uint64_t* words,
                   const int32_t* match, const float* rho, bool fuse, uint64_t* bitmaps, float* weights);

// The forward's rows of chunk m, in place in E (see upper_exps_band). With P_i = E_i / T_i and
// T_i = Σ_j E_i(j), row i becomes R'_i = T_i · R_i on its kept entries: E_i plus the
// fusion of SPEC §3.7 in the row's own units. Its pruned entries keep E_i (the fusion reads
// them; A·V skips them). Then A_i = alpha_i · R'_i with alpha_i = 1 / Σ_j R'_i(j). A row
// whose T_i is too small or not finite is recomputed from X (rows, `scale`) with its own
// maximum as the shift. Saves lse_i and log Z_i. Scratch: `bitmaps` holds
// Ω · bitmap_words(g) words (left holding the rows' masks).
//
// Returns false when some row cannot be trusted in float32 this way (see kResolution), or
// its log Z is below kSmallestLogRowSum (the backward's limit), and the pair must go to
// the portable path, which works in log space.
bool chunk_forward_rows(const Geometry& g, const Products& products, int64_t m, const float* x, const float* xt,
                        float scale, float shift, float* exps, const uint64_t* words, const int32_t* match,
                        const float* rho, bool fuse, uint64_t* bitmaps, float* lse, float* log_row_sum, float* alpha);

// Zeroes the pruned entries of rows of chunk m of E (their masks in `bitmaps`).
void zero_pruned(const Geometry& g, int64_t m, const uint64_t* bitmaps, float* exps);

}  // namespace bspf::cpu::avx2
