// The AVX2 path's dense and sparse products (gemm.h).
#include "gemm.h"

#include <immintrin.h>

namespace bspf::cpu::avx2 {
namespace {

// C[0..4)[0..8·NV) = alpha · Σ_k A[r][k] · B[k][0..8·NV): A's entries broadcast, B's rows
// loaded as vectors. 4×24 accumulators fill 12 of the 16 ymm registers. They are named
// variables, not an array: GCC kept an accumulator array in registers but also stored
// all of it to the stack on every iteration, which made the loop store-bound.
template <int NV>
inline void gemm_tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c,
                      int64_t ldc, __m256 alpha) {
  static_assert(NV >= 1 && NV <= 3, "4×8, 4×16 or 4×24 tiles");
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;
  __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;
  const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;
  for (int64_t k = 0; k < depth; ++k) {
    const float* bk = b + k * ldb;
    const __m256 b0 = _mm256_loadu_ps(bk);
    const __m256 b1 = NV > 1 ? _mm256_loadu_ps(bk + kLanes) : b0;
    const __m256 b2 = NV > 2 ? _mm256_loadu_ps(bk + 2 * kLanes) : b0;
    __m256 x = _mm256_broadcast_ss(a0 + k);
    c00 = _mm256_fmadd_ps(x, b0, c00);
    if (NV > 1) c01 = _mm256_fmadd_ps(x, b1, c01);
    if (NV > 2) c02 = _mm256_fmadd_ps(x, b2, c02);
    x = _mm256_broadcast_ss(a1 + k);
    c10 = _mm256_fmadd_ps(x, b0, c10);
    if (NV > 1) c11 = _mm256_fmadd_ps(x, b1, c11);
    if (NV > 2) c12 = _mm256_fmadd_ps(x, b2, c12);
    x = _mm256_broadcast_ss(a2 + k);
    c20 = _mm256_fmadd_ps(x, b0, c20);
    if (NV > 1) c21 = _mm256_fmadd_ps(x, b1, c21);
    if (NV > 2) c22 = _mm256_fmadd_ps(x, b2, c22);
    x = _mm256_broadcast_ss(a3 + k);
    c30 = _mm256_fmadd_ps(x, b0, c30);
    if (NV > 1) c31 = _mm256_fmadd_ps(x, b1, c31);
    if (NV > 2) c32 = _mm256_fmadd_ps(x, b2, c32);
  }
  const __m256 rows[4][3] = {{c00, c01, c02}, {c10, c11, c12}, {c20, c21, c22}, {c30, c31, c32}};
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + r * ldc + v * kLanes, _mm256_mul_ps(alpha, rows[r][v]));
}

// ------------------------------------------------------------ sparse row products

// Lane positions of the set bits of a byte, in increasing order: compress_table.lanes[b].
struct CompressTable {
  int32_t lanes[256][8];
};
constexpr CompressTable make_compress_table() {
  CompressTable t{};
  for (int byte = 0; byte < 256; ++byte) {
    int count = 0;
    for (int bit = 0; bit < 8; ++bit)
      if (byte >> bit & 1) t.lanes[byte][count++] = bit;
  }
  return t;
}
constexpr CompressTable compress_table = make_compress_table();

// The columns set in either of two row bitmaps (ld / 8 bytes each), in increasing order,
// written to `list` (ld + 8 entries) without a data-dependent branch; returns how many.
inline int64_t union_columns(const uint64_t* bitmap0, const uint64_t* bitmap1, int64_t ld, int32_t* list) {
  int64_t count = 0;
  uint64_t bits = 0;
  for (int64_t j = 0; j < ld; j += kLanes) {
    if (j % 64 == 0) bits = bitmap0[j / 64] | bitmap1[j / 64];
    const uint32_t byte = static_cast<uint32_t>(bits) & 0xFFu;
    const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(compress_table.lanes[byte]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(list + count),
                        _mm256_add_epi32(lanes, _mm256_set1_epi32(static_cast<int>(j))));
    count += __builtin_popcount(byte);
    bits >>= 8;
  }
  return count;
}

// Two rows at a time: out_r[0..8·NV) = alpha_r · Σ_j coef_r[j] · B[j][0..8·NV) over the
// listed columns j (the union of the two rows' kept columns; coef is 0 where a row
// prunes j). Each row of B loaded serves both rows.
template <int NV>
inline void sparse_pair_tile(const float* coef0, const float* coef1, const int32_t* list, int64_t count,
                             const float* b, int64_t ldb, float* out0, float* out1, __m256 alpha0, __m256 alpha1) {
  __m256 acc0[NV], acc1[NV];
  for (int v = 0; v < NV; ++v) acc0[v] = acc1[v] = _mm256_setzero_ps();
  for (int64_t e = 0; e < count; ++e) {
    const int64_t j = list[e];
    const __m256 s0 = _mm256_broadcast_ss(coef0 + j), s1 = _mm256_broadcast_ss(coef1 + j);
    const float* bj = b + j * ldb;
    for (int v = 0; v < NV; ++v) {
      const __m256 bv = _mm256_loadu_ps(bj + v * kLanes);
      acc0[v] = _mm256_fmadd_ps(s0, bv, acc0[v]);
      acc1[v] = _mm256_fmadd_ps(s1, bv, acc1[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    _mm256_storeu_ps(out0 + v * kLanes, _mm256_mul_ps(alpha0, acc0[v]));
    _mm256_storeu_ps(out1 + v * kLanes, _mm256_mul_ps(alpha1, acc1[v]));
  }
}

// Rows [0, rows) of a 64-wide product over each row's own kept columns (its bitmap, bw
// words, walked bit by bit: no column list goes through memory). The columns go one bitmap
// word at a time, 64 rows of B (16 KB), for up to 32 rows: that slice of B stays in L1 while
// every row takes its kept entries from it. Walking each row end to end instead read all of
// B (50 KB at N = 200, more than L1) from L2 once per row. The partial sums go through the
// output rows (8 KB, in L1 too), exactly (a float stored and loaded back), so the sums are
// those of one pass over the row. 8 accumulators hide the FMA latency.
void sparse_rows64(const float* coef, int64_t ldc, const uint64_t* bitmaps, int64_t bw, const float* b, int64_t ldb,
                   const float* alpha, int64_t rows, float* out, int64_t ldo) {
  constexpr int64_t kRowGroup = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowGroup) {
    const int64_t r1 = min64(rows, r0 + kRowGroup);
    for (int64_t w = 0; w < bw; ++w)
      for (int64_t r = r0; r < r1; ++r) {
        float* o = out + r * ldo;
        __m256 acc[8];
        for (int v = 0; v < 8; ++v) acc[v] = w == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(o + v * kLanes);
        __m256 acc0 = acc[0], acc1 = acc[1], acc2 = acc[2], acc3 = acc[3];
        __m256 acc4 = acc[4], acc5 = acc[5], acc6 = acc[6], acc7 = acc[7];
        const float* c = coef + r * ldc;
        for (uint64_t bits = bitmaps[r * bw + w]; bits; bits &= bits - 1) {
          const int64_t j = w * 64 + __builtin_ctzll(bits);
          const __m256 s = _mm256_broadcast_ss(c + j);
          const float* bj = b + j * ldb;
          acc0 = _mm256_fmadd_ps(s, _mm256_loadu_ps(bj), acc0);
          acc1 = _mm256_fmadd_ps(s, _mm256_loadu_ps(bj + 8), acc1);
          acc2 = _mm256_fmadd_ps(s, _mm256_loadu_ps(bj + 16), acc2);
          acc3 = _mm256_fmadd_ps(s, _mm256_loadu_ps(bj + 24), acc3);
          acc4 = _mm256_fmadd_ps(s, _mm256_loadu_ps(bj + 32), acc4);
          acc5 = _mm256_fmadd_ps(s, _mm256_loadu_ps(bj + 40), acc5);
          acc6 = _mm256_fmadd_ps(s, _mm256_loadu_ps(bj + 48), acc6);
          acc7 = _mm256_fmadd_ps(s, _mm256_loadu_ps(bj + 56), acc7);
        }
        const __m256 scale = _mm256_set1_ps(w + 1 == bw && alpha ? alpha[r] : 1.0f);
        const __m256 sums[8] = {acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7};
        for (int v = 0; v < 8; ++v) _mm256_storeu_ps(o + v * kLanes, _mm256_mul_ps(scale, sums[v]));
      }
  }
}

}  // namespace

void gemm(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc,
          int64_t rows, int64_t cols, float alpha, bool upper) {
  const __m256 va = _mm256_set1_ps(alpha);
  for (int64_t i = 0; i < rows; i += 4) {
    const float* ai = a + i * lda;
    float* ci = c + i * ldc;
    int64_t j = upper ? (i & ~int64_t{7}) : 0;
    for (; j + 24 <= cols; j += 24) gemm_tile<3>(ai, lda, b + j, ldb, depth, ci + j, ldc, va);
    if (cols - j == 16) gemm_tile<2>(ai, lda, b + j, ldb, depth, ci + j, ldc, va);
    if (cols - j == 8) gemm_tile<1>(ai, lda, b + j, ldb, depth, ci + j, ldc, va);
  }
}

void sparse_rows(const float* coef, int64_t ldc, const uint64_t* bitmaps, int64_t bw, int64_t ld, const float* b,
                 int64_t ldb, int64_t width, const float* alpha, int64_t rows, int32_t* lists, float* out,
                 int64_t ldo) {
  const int64_t stride = ld + kLanes;
  if (!sparse_rows_reads_pruned(width)) {
    // Over exactly each row's kept columns: no union overhead (~18% more FMAs at keep 0.5).
    sparse_rows64(coef, ldc, bitmaps, bw, b, ldb, alpha, rows, out, ldo);
    return;
  }
  for (int64_t r = 0; r < rows; r += 2) {
    const int64_t r1 = r + 1 < rows ? r + 1 : r;
    int32_t* list = lists + (r / 2) * stride;
    list[0] = static_cast<int32_t>(union_columns(bitmaps + r * bw, bitmaps + r1 * bw, ld, list + 1));
  }
  for (int64_t col = 0; col < width; col += 32) {
    const float* bc = b + col;
    const int64_t nv = min64(4, (width - col) / kLanes);
    for (int64_t r = 0; r < rows; r += 2) {
      const int64_t r1 = r + 1 < rows ? r + 1 : r;
      const int32_t* list = lists + (r / 2) * stride;
      const float* c0 = coef + r * ldc;
      const float* c1 = coef + r1 * ldc;
      float* o0 = out + r * ldo + col;
      float* o1 = out + r1 * ldo + col;
      const __m256 a0 = _mm256_set1_ps(alpha ? alpha[r] : 1.0f), a1 = _mm256_set1_ps(alpha ? alpha[r1] : 1.0f);
      switch (nv) {
        case 1: sparse_pair_tile<1>(c0, c1, list + 1, list[0], bc, ldb, o0, o1, a0, a1); break;
        case 2: sparse_pair_tile<2>(c0, c1, list + 1, list[0], bc, ldb, o0, o1, a0, a1); break;
        case 3: sparse_pair_tile<3>(c0, c1, list + 1, list[0], bc, ldb, o0, o1, a0, a1); break;
        default: sparse_pair_tile<4>(c0, c1, list + 1, list[0], bc, ldb, o0, o1, a0, a1); break;
      }
    }
  }
}

void copy_rows(const float* src, int64_t lds, int64_t rows, int64_t width, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) copy_exact(src + r * lds, width, dst + r * ldd);
}

void logits_band(const Geometry& g, const Products& products, const float* x, const float* xt, float scale,
                 int64_t i0, float* logits) {
  // Columns from i0 (tiles from i & ~7 = i0 for each of the band's rows): the same tiles as
  // one GEMM over the whole square, so the same logits bit for bit.
  products.gemm(x + i0 * g.dp, g.dp, xt + i0, g.ld, g.d, logits + i0 * g.ld + i0, g.ld, 8, g.ld - i0, scale,
                /*upper=*/true);
}

void mirror_band(const Geometry& g, Mirror mirror, int64_t i0, float* logits) {
  // Rows [i0, i0 + 8) start in the chunk that starts at column `own`; the tiles of columns
  // [j, j + 8) that end in it or later are those from j = own & ~7: one integer division
  // per 8 rows, where testing each tile took two.
  const int64_t own = i0 / g.omega * g.omega;
  for (int64_t j = mirror == Mirror::kAll ? 0 : own & ~int64_t{7}; j < i0; j += 8)
    transpose8(logits + j * g.ld + i0, g.ld, logits + i0 * g.ld + j, g.ld);
}

void logit_row(const Geometry& g, const float* x, const float* xt, float scale, int64_t i, float* row) {
  const float* xi = x + i * g.dp;
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < g.ld; j += kLanes) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < g.d; ++k)
      acc = _mm256_fmadd_ps(_mm256_broadcast_ss(xi + k), _mm256_loadu_ps(xt + k * g.ld + j), acc);
    _mm256_storeu_ps(row + j, _mm256_mul_ps(vscale, acc));
  }
}

void gather_x_band(const Geometry& g, const float* qk, const int64_t* stride, int64_t pair, int64_t heads,
                   int64_t i0, float* x) {
  gather(qk, stride, pair, heads, g.n, g.d, i0, i0 + 8, g.dp, x);
}

void transpose_x_band(const Geometry& g, int64_t i0, const float* x, float* xt) {
  transpose(x + i0 * g.dp, g.dp, 8, g.dp, xt + i0, g.ld);
}

}  // namespace bspf::cpu::avx2
