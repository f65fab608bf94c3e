// The AVX2 path's products: dense GEMM (the logits L = scale · X Xᵀ, and the backward's
// products), and the sparse row products that multiply only kept entries into V.
#pragma once

#include <cstdint>

#include "workspace.h"

namespace bspf::cpu::avx2 {

// Rows [row_begin, row_end) (multiples of 4) of C = alpha · A·B, columns [col_begin(i0), cols)
// where col_begin is `upper ? i0 rounded down to 8 : 0`; cols is a multiple of 8.
void gemm(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc,
          int64_t rows, int64_t cols, float alpha, bool upper);

// Whether sparse_rows reads the coefficients of pruned entries (which must then be 0):
// only at kOwnColumnsWidth does it go over each row's own kept columns (kernels.h).
inline bool sparse_rows_reads_pruned(int64_t width) { return width != kOwnColumnsWidth; }

// Rows [0, rows) of OUT = diag(alpha) · COEF·B, each row restricted to its kept entries:
// row r has coefficients coef + r·ldc (see sparse_rows_reads_pruned), its mask as a bitmap
// at bitmaps + r·bw (ld / 8 bytes) and alpha[r] (1 when alpha is null); B is width floats
// wide (a multiple of 8); OUT row r is out + r·ldo. `lists` is scratch of
// ((rows + 1) / 2) · (ld + 8) ints. A 64-wide B goes one row at a time (see below).
// Otherwise columns of B go in slices of 32 outside, rows in pairs inside: a 32-wide slice
// of B (25 KB at N = 200) stays in L1 for all rows, where whole rows of B would stream
// from L2.
void sparse_rows(const float* coef, int64_t ldc, const uint64_t* bitmaps, int64_t bw, int64_t ld, const float* b,
                 int64_t ldb, int64_t width, const float* alpha, int64_t rows, int32_t* lists, float* out,
                 int64_t ldo);

// Copies rows × width floats from a buffer with row stride lds to one with row stride ldd.
void copy_rows(const float* src, int64_t lds, int64_t rows, int64_t width, float* dst, int64_t ldd);

// Which lower 8×8 tiles of L a caller reads, and so mirrors: those that share a token chunk
// with their row (the forward's matching reads the diagonal blocks), or all (the
// backward). block_mask reads upper blocks only and mirrors none.
enum class Mirror { kDiagonalBlocks, kAll };

// L = scale · X Xᵀ over the ld×ld square: upper 8×8 tiles by products.gemm, the lower ones
// the caller reads mirrored (QQᵀ is symmetric). Padding rows/columns come out 0 since X's
// padding rows are 0. By row bands of 8 (the steps a team shares out): the GEMM of band
// i0's upper tiles, then, once every band's are done, its lower tiles mirrored.
void logits_band(const Geometry& g, const Products& products, const float* x, const float* xt, float scale,
                 int64_t i0, float* logits);
void mirror_band(const Geometry& g, Mirror mirror, int64_t i0, float* logits);

// Row i of L = scale · X Xᵀ recomputed from X and Xᵀ (padded, 0 past N) into `row` (ld
// floats), for the forward, whose logits tile has become E by then. Bit for bit the
// logits of logits_band (the same FMA chain over k per entry), so the lse saved from
// such a row matches the logits the backward recomputes.
void logit_row(const Geometry& g, const float* x, const float* xt, float scale, int64_t i, float* row);

// The first steps of every entry point, by row bands of 8 (the steps a team shares out):
// rows [i0, i0 + 8) of X gathered into x (dp floats a row); then, once gathered, transposed
// into columns [i0, i0 + 8) of Xᵀ (ld floats a row). All rows gathered first, then all
// transposed: ~1.5% of the forward faster than each band's transpose right after its
// gather.
void gather_x_band(const Geometry& g, const float* qk, const int64_t* stride, int64_t pair, int64_t heads,
                   int64_t i0, float* x);
void transpose_x_band(const Geometry& g, int64_t i0, const float* x, float* xt);

}  // namespace bspf::cpu::avx2
