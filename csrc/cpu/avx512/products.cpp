// The AVX-512 products (kernels.h, avx512::kProducts): the AVX2 path's dense GEMM, sparse
// row products, block scoring, forward row work (exps, row sums, fusion) and the
// backward's P computed 16 lanes wide, on CPUs with AVX-512F. Everything else of the path is the AVX2 code: the two
// products are over half of a forward at the target shape and are bound by FMA
// throughput, which 512-bit vectors double on a CPU with two 512-bit FMA units; a block
// row of 16 scores, or a chunk of 16 columns, is one vector, and the AVX2 stages beside
// 512-bit ones ran at the lower clock those leave behind (docs/performance.md, "The
// AVX-512 products").
//
// Compiled with -mavx512f (cmake/SimdFlags.cmake). It includes no header of the AVX2 path
// and uses no std:: code, so no inline function compiled here can be merged with an AVX2 or
// portable translation unit's copy (see kernels.h).
//
// Results: the GEMM forms every entry with the same FMA chain over k as the AVX2 GEMM, so
// logits are bit for bit those of the AVX2 path (the forward's logit_row relies on that).
// The 64-wide sparse product sums each row's entries in another order (the columns it
// shares with its neighbour row first, then its own in two interleaved halves), so it
// differs from the AVX2 path in rounding only; at other widths the sums are the same. The
// block scores and their order keys are the AVX2 path's bit for bit, so both choose the
// same mask; so are the exps. Row sums and fusion sums add in another order (rounding only).
//
// Accumulators are named variables, not arrays: GCC keeps an array of accumulators in
// registers but may also store all of it on every iteration, which makes a loop store-bound.
#include <immintrin.h>

#include "../kernels.h"

namespace bspf::cpu::avx512 {
namespace {

constexpr int64_t kLanes = 16;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Lanes [0, n) set, n in [0, 16].
inline __mmask16 lanes_below(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// Vector v of a tile row of NV vectors: whole, or masked by `last` when it is the last one.
template <int NV>
inline __m512 load_part(const float* p, int v, __mmask16 last) {
  return v + 1 < NV ? _mm512_loadu_ps(p + v * kLanes) : _mm512_maskz_loadu_ps(last, p + v * kLanes);
}
template <int NV>
inline void store_part(float* p, int v, __mmask16 last, __m512 value) {
  if (v + 1 < NV)
    _mm512_storeu_ps(p + v * kLanes, value);
  else
    _mm512_mask_storeu_ps(p + v * kLanes, last, value);
}

// C[0..4)[0..16·NV) = alpha · Σ_k A[r][k] · B[k][...]: A's entries broadcast, B's rows loaded
// as vectors, the last one under `last` (a tile may end on 8 columns). 4×4 accumulators:
// per k, 8 loads for 16 FMAs.
template <int NV>
inline void gemm_tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc,
                      __m512 alpha, __mmask16 last) {
  static_assert(NV >= 1 && NV <= 4, "4×16 to 4×64 tiles");
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00;
  __m512 c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00;
  const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;
  for (int64_t k = 0; k < depth; ++k) {
    const float* bk = b + k * ldb;
    const __m512 b0 = load_part<NV>(bk, 0, last);
    const __m512 b1 = NV > 1 ? load_part<NV>(bk, 1, last) : b0;
    const __m512 b2 = NV > 2 ? load_part<NV>(bk, 2, last) : b0;
    const __m512 b3 = NV > 3 ? load_part<NV>(bk, 3, last) : b0;
    __m512 x = _mm512_set1_ps(a0[k]);
    c00 = _mm512_fmadd_ps(x, b0, c00);
    if (NV > 1) c01 = _mm512_fmadd_ps(x, b1, c01);
    if (NV > 2) c02 = _mm512_fmadd_ps(x, b2, c02);
    if (NV > 3) c03 = _mm512_fmadd_ps(x, b3, c03);
    x = _mm512_set1_ps(a1[k]);
    c10 = _mm512_fmadd_ps(x, b0, c10);
    if (NV > 1) c11 = _mm512_fmadd_ps(x, b1, c11);
    if (NV > 2) c12 = _mm512_fmadd_ps(x, b2, c12);
    if (NV > 3) c13 = _mm512_fmadd_ps(x, b3, c13);
    x = _mm512_set1_ps(a2[k]);
    c20 = _mm512_fmadd_ps(x, b0, c20);
    if (NV > 1) c21 = _mm512_fmadd_ps(x, b1, c21);
    if (NV > 2) c22 = _mm512_fmadd_ps(x, b2, c22);
    if (NV > 3) c23 = _mm512_fmadd_ps(x, b3, c23);
    x = _mm512_set1_ps(a3[k]);
    c30 = _mm512_fmadd_ps(x, b0, c30);
    if (NV > 1) c31 = _mm512_fmadd_ps(x, b1, c31);
    if (NV > 2) c32 = _mm512_fmadd_ps(x, b2, c32);
    if (NV > 3) c33 = _mm512_fmadd_ps(x, b3, c33);
  }
  const __m512 rows[4][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}};
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) store_part<NV>(c + r * ldc, v, last, _mm512_mul_ps(alpha, rows[r][v]));
}

// c · the 64-wide row at bj added into the 4-vector sum r0..r3.
__attribute__((always_inline)) inline void add_row64(__m512 c, const float* bj, __m512& r0, __m512& r1, __m512& r2,
                                                     __m512& r3) {
  r0 = _mm512_fmadd_ps(c, _mm512_loadu_ps(bj), r0);
  r1 = _mm512_fmadd_ps(c, _mm512_loadu_ps(bj + 16), r1);
  r2 = _mm512_fmadd_ps(c, _mm512_loadu_ps(bj + 32), r2);
  r3 = _mm512_fmadd_ps(c, _mm512_loadu_ps(bj + 48), r3);
}

// One row's kept columns of one bitmap word (`bits`, columns of B from `b`) added into its
// 4-vector sums; consecutive columns alternate between the sets e and o, so 8 FMA chains are
// in flight.
__attribute__((always_inline)) inline void add_own_columns(uint64_t bits, const float* c, const float* b,
                                                           int64_t ldb, __m512& e0, __m512& e1, __m512& e2,
                                                           __m512& e3, __m512& o0, __m512& o1, __m512& o2,
                                                           __m512& o3) {
  while (bits) {
    const int64_t j = __builtin_ctzll(bits);
    bits &= bits - 1;
    add_row64(_mm512_set1_ps(c[j]), b + j * ldb, e0, e1, e2, e3);
    if (!bits) break;
    const int64_t j2 = __builtin_ctzll(bits);
    bits &= bits - 1;
    add_row64(_mm512_set1_ps(c[j2]), b + j2 * ldb, o0, o1, o2, o3);
  }
}

// The 4-vector sums e + o of a row, times `scale`, into its output row.
inline void store_row64(float* o, __m512 scale, __m512 e0, __m512 e1, __m512 e2, __m512 e3, __m512 o0, __m512 o1,
                        __m512 o2, __m512 o3) {
  _mm512_storeu_ps(o, _mm512_mul_ps(scale, _mm512_add_ps(e0, o0)));
  _mm512_storeu_ps(o + 16, _mm512_mul_ps(scale, _mm512_add_ps(e1, o1)));
  _mm512_storeu_ps(o + 32, _mm512_mul_ps(scale, _mm512_add_ps(e2, o2)));
  _mm512_storeu_ps(o + 48, _mm512_mul_ps(scale, _mm512_add_ps(e3, o3)));
}

// Rows [0, rows) of a 64-wide product over each row's own kept columns, as the AVX2 path's
// sparse_rows64: one bitmap word (64 rows of B, 16 KB, kept in L1) at a time for up to 32
// rows, partial sums through the output rows. A row is 4 vectors. Rows go two at a time:
// the columns both keep (about three in four of each row's, the 3×3 scores of neighbouring
// rows being alike) are walked once, each row of B loaded serving both rows, so a column
// costs 8 FMAs and 6 loads instead of 8 FMAs and 10 loads — the loads of B, not the FMAs,
// bound the walk of one row (a C++ harness on real masks: 4.2 → 3.7 ticks per kept entry,
// docs/performance.md). Then each row's own columns, alone.
void sparse_rows64(const float* coef, int64_t ldc, const uint64_t* bitmaps, int64_t bw, const float* b, int64_t ldb,
                   const float* alpha, int64_t rows, float* out, int64_t ldo) {
  constexpr int64_t kRowGroup = 32;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t r0 = 0; r0 < rows; r0 += kRowGroup) {
    const int64_t r1 = min64(rows, r0 + kRowGroup);
    for (int64_t w = 0; w < bw; ++w) {
      const float* bw0 = b + w * 64 * ldb;
      const bool last_word = w + 1 == bw;
      for (int64_t r = r0; r < r1; r += 2) {
        // A lone last row pairs with itself under an empty bitmap and is stored once.
        const bool two = r + 1 < r1;
        const int64_t r2 = two ? r + 1 : r;
        float* out0 = out + r * ldo;
        float* out1 = out + r2 * ldo;
        const float* c0 = coef + r * ldc + w * 64;
        const float* c1 = coef + r2 * ldc + w * 64;
        __m512 a0 = zero, a1 = zero, a2 = zero, a3 = zero, b0 = zero, b1 = zero, b2 = zero, b3 = zero;
        if (w != 0) {
          a0 = _mm512_loadu_ps(out0), a1 = _mm512_loadu_ps(out0 + 16);
          a2 = _mm512_loadu_ps(out0 + 32), a3 = _mm512_loadu_ps(out0 + 48);
          b0 = _mm512_loadu_ps(out1), b1 = _mm512_loadu_ps(out1 + 16);
          b2 = _mm512_loadu_ps(out1 + 32), b3 = _mm512_loadu_ps(out1 + 48);
        }
        const uint64_t kept0 = bitmaps[r * bw + w], kept1 = two ? bitmaps[r2 * bw + w] : 0;
        for (uint64_t both = kept0 & kept1; both; both &= both - 1) {
          const int64_t j = __builtin_ctzll(both);
          const __m512 s = _mm512_set1_ps(c0[j]), t = _mm512_set1_ps(c1[j]);
          const float* bj = bw0 + j * ldb;
          const __m512 v0 = _mm512_loadu_ps(bj), v1 = _mm512_loadu_ps(bj + 16);
          const __m512 v2 = _mm512_loadu_ps(bj + 32), v3 = _mm512_loadu_ps(bj + 48);
          a0 = _mm512_fmadd_ps(s, v0, a0), a1 = _mm512_fmadd_ps(s, v1, a1);
          a2 = _mm512_fmadd_ps(s, v2, a2), a3 = _mm512_fmadd_ps(s, v3, a3);
          b0 = _mm512_fmadd_ps(t, v0, b0), b1 = _mm512_fmadd_ps(t, v1, b1);
          b2 = _mm512_fmadd_ps(t, v2, b2), b3 = _mm512_fmadd_ps(t, v3, b3);
        }
        __m512 p0 = zero, p1 = zero, p2 = zero, p3 = zero, q0 = zero, q1 = zero, q2 = zero, q3 = zero;
        add_own_columns(kept0 & ~kept1, c0, bw0, ldb, a0, a1, a2, a3, p0, p1, p2, p3);
        add_own_columns(kept1 & ~kept0, c1, bw0, ldb, b0, b1, b2, b3, q0, q1, q2, q3);
        const __m512 scale0 = _mm512_set1_ps(last_word && alpha ? alpha[r] : 1.0f);
        const __m512 scale1 = _mm512_set1_ps(last_word && alpha ? alpha[r2] : 1.0f);
        if (two) store_row64(out1, scale1, b0, b1, b2, b3, q0, q1, q2, q3);
        store_row64(out0, scale0, a0, a1, a2, a3, p0, p1, p2, p3);
      }
    }
  }
}

// The columns set in either of two row bitmaps (ld / 8 bytes each), in increasing order,
// into `list` (room for ld + 8 entries); returns how many. 16 columns per step: the column
// numbers of their set bits compressed to the front.
inline int64_t union_columns(const uint64_t* bitmap0, const uint64_t* bitmap1, int64_t ld, int32_t* list) {
  int64_t count = 0;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = 0; j < ld; j += kLanes) {
    const uint64_t word = bitmap0[j / 64] | bitmap1[j / 64];
    const __mmask16 bits = static_cast<__mmask16>((word >> (j % 64)) & lanes_below(ld - j));
    const __m512i columns = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j)));
    _mm512_mask_compressstoreu_epi32(list + count, bits, columns);
    count += __builtin_popcount(bits);
  }
  return count;
}

// Two rows at a time, 16·NV columns of B (the last vector under `last`): out_r = alpha_r ·
// Σ_j coef_r[j] · B[j] over the listed columns (the union of both rows' kept columns; coef
// is 0 where a row prunes j). Each row of B loaded serves both rows.
template <int NV>
inline void sparse_pair_tile(const float* coef0, const float* coef1, const int32_t* list, int64_t count,
                             const float* b, int64_t ldb, float* out0, float* out1, __m512 alpha0, __m512 alpha1,
                             __mmask16 last) {
  static_assert(NV >= 1 && NV <= 4, "16 to 64 columns");
  __m512 p0 = _mm512_setzero_ps(), p1 = p0, p2 = p0, p3 = p0, q0 = p0, q1 = p0, q2 = p0, q3 = p0;
  for (int64_t e = 0; e < count; ++e) {
    const int64_t j = list[e];
    const __m512 s0 = _mm512_set1_ps(coef0[j]), s1 = _mm512_set1_ps(coef1[j]);
    const float* bj = b + j * ldb;
    const __m512 b0 = load_part<NV>(bj, 0, last);
    p0 = _mm512_fmadd_ps(s0, b0, p0);
    q0 = _mm512_fmadd_ps(s1, b0, q0);
    if (NV > 1) {
      const __m512 b1 = load_part<NV>(bj, 1, last);
      p1 = _mm512_fmadd_ps(s0, b1, p1);
      q1 = _mm512_fmadd_ps(s1, b1, q1);
    }
    if (NV > 2) {
      const __m512 b2 = load_part<NV>(bj, 2, last);
      p2 = _mm512_fmadd_ps(s0, b2, p2);
      q2 = _mm512_fmadd_ps(s1, b2, q2);
    }
    if (NV > 3) {
      const __m512 b3 = load_part<NV>(bj, 3, last);
      p3 = _mm512_fmadd_ps(s0, b3, p3);
      q3 = _mm512_fmadd_ps(s1, b3, q3);
    }
  }
  const __m512 first[4] = {p0, p1, p2, p3}, second[4] = {q0, q1, q2, q3};
  for (int v = 0; v < NV; ++v) {
    store_part<NV>(out0, v, last, _mm512_mul_ps(alpha0, first[v]));
    store_part<NV>(out1, v, last, _mm512_mul_ps(alpha1, second[v]));
  }
}

void gemm(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc,
          int64_t rows, int64_t cols, float alpha, bool upper) {
  const __m512 va = _mm512_set1_ps(alpha);
  for (int64_t i = 0; i < rows; i += 4) {
    const float* ai = a + i * lda;
    float* ci = c + i * ldc;
    int64_t j = upper ? (i & ~int64_t{7}) : 0;
    for (; j + 64 <= cols; j += 64) gemm_tile<4>(ai, lda, b + j, ldb, depth, ci + j, ldc, va, 0xFFFF);
    const int64_t rest = cols - j, nv = (rest + kLanes - 1) / kLanes;  // rest: a multiple of 8 below 64
    const __mmask16 last = lanes_below(rest - (nv - 1) * kLanes);
    switch (nv) {
      case 1: gemm_tile<1>(ai, lda, b + j, ldb, depth, ci + j, ldc, va, last); break;
      case 2: gemm_tile<2>(ai, lda, b + j, ldb, depth, ci + j, ldc, va, last); break;
      case 3: gemm_tile<3>(ai, lda, b + j, ldb, depth, ci + j, ldc, va, last); break;
      case 4: gemm_tile<4>(ai, lda, b + j, ldb, depth, ci + j, ldc, va, last); break;
      default: break;
    }
  }
}

void sparse_rows(const float* coef, int64_t ldc, const uint64_t* bitmaps, int64_t bw, int64_t ld, const float* b,
                 int64_t ldb, int64_t width, const float* alpha, int64_t rows, int32_t* lists, float* out,
                 int64_t ldo) {
  if (width == avx2::kOwnColumnsWidth) {
    sparse_rows64(coef, ldc, bitmaps, bw, b, ldb, alpha, rows, out, ldo);
    return;
  }
  const int64_t stride = ld + 8;  // the lists' layout, as the AVX2 path's (gemm.h)
  for (int64_t r = 0; r < rows; r += 2) {
    const int64_t r1 = r + 1 < rows ? r + 1 : r;
    int32_t* list = lists + (r / 2) * stride;
    list[0] = static_cast<int32_t>(union_columns(bitmaps + r * bw, bitmaps + r1 * bw, ld, list + 1));
  }
  // Slices of 64 columns outside, pairs of rows inside: the slice of B stays in L1.
  for (int64_t col = 0; col < width; col += 64) {
    const int64_t slice = min64(64, width - col), nv = (slice + kLanes - 1) / kLanes;  // slice: a multiple of 8
    const __mmask16 last = lanes_below(slice - (nv - 1) * kLanes);
    const float* bc = b + col;
    for (int64_t r = 0; r < rows; r += 2) {
      const int64_t r1 = r + 1 < rows ? r + 1 : r;
      const int32_t* list = lists + (r / 2) * stride;
      const float* c0 = coef + r * ldc;
      const float* c1 = coef + r1 * ldc;
      float* o0 = out + r * ldo + col;
      float* o1 = out + r1 * ldo + col;
      const __m512 a0 = _mm512_set1_ps(alpha ? alpha[r] : 1.0f), a1 = _mm512_set1_ps(alpha ? alpha[r1] : 1.0f);
      switch (nv) {
        case 1: sparse_pair_tile<1>(c0, c1, list + 1, list[0], bc, ldb, o0, o1, a0, a1, last); break;
        case 2: sparse_pair_tile<2>(c0, c1, list + 1, list[0], bc, ldb, o0, o1, a0, a1, last); break;
        case 3: sparse_pair_tile<3>(c0, c1, list + 1, list[0], bc, ldb, o0, o1, a0, a1, last); break;
        default: sparse_pair_tile<4>(c0, c1, list + 1, list[0], bc, ldb, o0, o1, a0, a1, last); break;
      }
    }
  }
}

// Float → int32 whose signed order is the float order; -0 counts as +0 and NaN as -inf
// (NaN ranks last): the AVX2 path's order keys, 16 at a time. kNanLast false: for scores
// whose block is scored again when one is not finite (the uniform kernel's), NaN's key is
// left as it falls.
template <bool kNanLast>
inline __m512i order_key(__m512 s) {
  s = _mm512_add_ps(s, _mm512_setzero_ps());  // -0 + 0 = +0
  if (kNanLast) s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, s, _CMP_ORD_Q), _mm512_set1_ps(-__builtin_inff()), s);
  const __m512i bits = _mm512_castps_si512(s);
  const __m512i flip = _mm512_and_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32(0x7FFFFFFF));
  return _mm512_xor_si512(bits, flip);
}

// avx2::score_block 16 lanes wide (selection.h: the same key layout, and the same FMA chain
// per score over the same values, so the same keys bit for bit; a block row of 16 entries
// is one vector). The logits are read where they are, under masks that give the +0 the
// AVX2 path's zero-bordered tile holds outside the block, so `tile` is not used.
//
// kWhole: the block's columns are whole vectors (a multiple of 16: at Ω = 16, 32, 48 or 64
// every upper block but a ragged last column of them): no lane is padding, and the masks
// that keep padding out of the keys and the sums are left out. Scoring is bound by its
// instruction count (~40 per block row, not the 9-FMA chain): this took 12–13% off it.
//
// kUniform: all nine weights equal (the box kernel): w · ((h_above + h_here) + h_below)
// with h a block row's three reads summed, (left + centre) + right — the AVX2 path's
// uniform scores, operation for operation (see avx2::score_block).
template <bool kWhole, bool kUniform>
avx2::BlockScores score_block_lanes(const float* block, int64_t ld, int64_t rows, int64_t cols,
                                    const float* score_kernel, int32_t* keys) {
  const int64_t sp = (cols + 7) & ~int64_t{7};  // key row stride
  const __m512 zero = _mm512_setzero_ps();
  __m512 w[9];
  for (int e = 0; e < 9; ++e) w[e] = _mm512_set1_ps(score_kernel[e]);
  const __m512i padding = _mm512_set1_epi32(INT32_MIN);  // below every real key
  __m512i lowest = _mm512_set1_epi32(INT32_MAX), highest = padding;
  __m512 sum = zero, sum_squares = zero;
  // Block columns outside, rows inside: the masks are a column's.
  for (int64_t j = 0; j < sp; j += kLanes) {  // j < cols: sp is cols rounded up to 8
    // Kernel column dj reads block column j + lane + dj − 1: the lanes where that is in
    // [0, cols). Kernel rows above the first block row and below the last read nothing.
    const __mmask16 centre = lanes_below(cols - j), right = lanes_below(cols - j - 1);
    const __mmask16 left = static_cast<__mmask16>(lanes_below(cols - j + 1) & (j == 0 ? 0xFFFEu : 0xFFFFu));
    const __mmask16 real = centre, stored = lanes_below(sp - j);
    // A block row's three reads, one per kernel column, 0 outside the block: each is used by
    // three output rows, so they roll down the block (above, here, below) and a row loads 3.
    auto load_taps = [&](int64_t row, __m512* taps) {
      const bool inside = row < rows;
      const float* p = block + row * ld + j;
      taps[0] = inside ? _mm512_maskz_loadu_ps(left, p - 1) : zero;
      taps[1] = inside ? (kWhole ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(centre, p)) : zero;
      taps[2] = inside ? _mm512_maskz_loadu_ps(right, p + 1) : zero;
    };
    auto row_sum = [](const __m512* taps) { return _mm512_add_ps(_mm512_add_ps(taps[0], taps[1]), taps[2]); };
    __m512 above[3] = {zero, zero, zero}, here[3], below[3];
    load_taps(0, here);
    __m512 sum_above = zero, sum_here = row_sum(here);  // kUniform: the rows' three reads summed
    for (int64_t i = 0; i < rows; ++i) {
      load_taps(i + 1, below);
      __m512 s;
      if (kUniform) {
        const __m512 sum_below = row_sum(below);
        s = _mm512_mul_ps(w[0], _mm512_add_ps(_mm512_add_ps(sum_above, sum_here), sum_below));
        sum_above = sum_here;
        sum_here = sum_below;
      } else {
        s = _mm512_mul_ps(w[0], above[0]);  // the kernel's entries in order, as the AVX2 path
        s = _mm512_fmadd_ps(w[1], above[1], s);
        s = _mm512_fmadd_ps(w[2], above[2], s);
        s = _mm512_fmadd_ps(w[3], here[0], s);
        s = _mm512_fmadd_ps(w[4], here[1], s);
        s = _mm512_fmadd_ps(w[5], here[2], s);
        s = _mm512_fmadd_ps(w[6], below[0], s);
        s = _mm512_fmadd_ps(w[7], below[1], s);
        s = _mm512_fmadd_ps(w[8], below[2], s);
        for (int t = 0; t < 3; ++t) {
          above[t] = here[t];
          here[t] = below[t];
        }
      }
      if (kWhole) {
        const __m512i key = order_key<!kUniform>(s);
        lowest = _mm512_min_epi32(lowest, key);
        highest = _mm512_max_epi32(highest, key);
        _mm512_storeu_si512(keys + i * sp + j, key);
      } else {
        const __m512i key = _mm512_mask_blend_epi32(real, padding, order_key<!kUniform>(s));
        lowest = _mm512_mask_min_epi32(lowest, real, lowest, key);
        highest = _mm512_max_epi32(highest, key);
        s = _mm512_maskz_mov_ps(real, s);
        _mm512_mask_storeu_epi32(keys + i * sp + j, stored, key);
      }
      sum = _mm512_add_ps(sum, s);
      sum_squares = _mm512_fmadd_ps(s, s, sum_squares);
    }
  }
  const int64_t rp = (rows + 7) & ~int64_t{7};
  for (int64_t i = rows; i < rp; ++i)
    for (int64_t j = 0; j < sp; j += kLanes) _mm512_mask_storeu_epi32(keys + i * sp + j, lanes_below(sp - j), padding);

  avx2::BlockScores scores;
  const double entries = static_cast<double>(rows * cols);
  scores.mean = _mm512_reduce_add_ps(sum) / entries;
  const double variance = _mm512_reduce_add_ps(sum_squares) / entries - scores.mean * scores.mean;
  scores.deviation = variance > 0.0 ? __builtin_sqrt(variance) : 0.0;  // 0 (no model) for NaN too
  scores.lowest_key = _mm512_reduce_min_epi32(lowest);
  scores.highest_key = _mm512_reduce_max_epi32(highest);
  return scores;
}

avx2::BlockScores score_block(const float* block, int64_t ld, int64_t rows, int64_t cols, const float* score_kernel,
                              float* /*tile*/, int32_t* keys) {
  const bool whole = cols % kLanes == 0;
  if (avx2::uniform_kernel(score_kernel)) {
    const avx2::BlockScores scores = whole ? score_block_lanes<true, true>(block, ld, rows, cols, score_kernel, keys)
                                           : score_block_lanes<false, true>(block, ld, rows, cols, score_kernel, keys);
    if (avx2::finite_scores(scores)) return scores;
  }
  return whole ? score_block_lanes<true, false>(block, ld, rows, cols, score_kernel, keys)
               : score_block_lanes<false, false>(block, ld, rows, cols, score_kernel, keys);
}

// avx2::kept_words 16 lanes wide: a block row's compare of 16 keys is its kept bits as a
// mask register, and the same mask sets bit i of the lanes (columns) that row i keeps in a
// vector of column words, so the mirrored block's rows come without a bit transpose (the
// AVX2 path's kept bits, transpose and writes took ~20% of the mask stage). The same
// words bit for bit.
void kept_words(const int32_t* keys, int64_t rows, int64_t cols, int32_t threshold, uint64_t* upper, uint64_t* lower,
                int64_t stride) {
  const int64_t sp = (cols + 7) & ~int64_t{7};  // key row stride
  const __m512i t = _mm512_set1_epi32(threshold);
  for (int64_t j0 = 0; j0 < cols; j0 += kLanes) {
    const __mmask16 lanes = lanes_below(sp - j0);  // this row's keys; the next row's follow
    // Rows [begin, end), at most 32, into bit i − begin of each column's 32-bit lane; their
    // row words take this slice's bits.
    auto column_words = [&](int64_t begin, int64_t end) {
      __m512i columns = _mm512_setzero_si512(), bit = _mm512_set1_epi32(1);
      for (int64_t i = begin; i < end; ++i) {
        const __mmask16 kept =
            _mm512_mask_cmpge_epi32_mask(lanes, _mm512_maskz_loadu_epi32(lanes, keys + i * sp + j0), t);
        const uint64_t part = uint64_t{_cvtmask16_u32(kept)} << j0;
        upper[i * stride] = j0 == 0 ? part : upper[i * stride] | part;
        columns = _mm512_mask_or_epi32(columns, kept, columns, bit);
        bit = _mm512_slli_epi32(bit, 1);
      }
      return columns;
    };
    alignas(64) uint32_t low[16], high[16];
    _mm512_store_si512(low, column_words(0, min64(rows, 32)));
    _mm512_store_si512(high, column_words(32, rows));
    for (int64_t j = j0; j < min64(cols, j0 + kLanes); ++j)
      lower[j * stride] = low[j - j0] | uint64_t{high[j - j0]} << 32;
  }
}

// avx2::exp256 16 lanes wide: the same operations, so the same values bit for bit.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.0f));
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic);
  const __m512 n = _mm512_sub_ps(t, magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.357120811007917e-3f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.372687734663486e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.167356714606285e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666479408740997e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.9999967217445374e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

// avx2::upper_exps (softmax_fusion.h) 16 lanes wide, the same tiles: row i from column
// i & ~7 to ld (a multiple of 8, so a row's last vector may be half of one).
void upper_exps(float* square, int64_t ld, int64_t n, float shift, int64_t row_begin, int64_t row_end) {
  const __m512 vshift = _mm512_set1_ps(shift), zero = _mm512_setzero_ps();
  for (int64_t i = row_begin; i < row_end; ++i) {
    float* e = square + i * ld;
    for (int64_t j = i & ~int64_t{7}; j < ld; j += kLanes) {
      const __mmask16 part = lanes_below(ld - j);
      __m512 v = zero;
      if (i < n)
        v = _mm512_maskz_mov_ps(lanes_below(n - j), exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(part, e + j), vshift)));
      _mm512_mask_storeu_ps(e + j, part, v);
    }
  }
}

// avx2::row_sums 16 lanes wide: the mask bits are the lanes' write mask.
void row_sums(const float* row, int64_t ld, const uint64_t* bitmap, float* total, float* kept) {
  __m512 sum0 = _mm512_setzero_ps(), sum1 = sum0, kept0 = sum0, kept1 = sum0;
  int64_t j = 0;
  for (; j + 2 * kLanes <= ld; j += 2 * kLanes) {
    const uint32_t bits = static_cast<uint32_t>(bitmap[j / 64] >> (j % 64));
    const __m512 e0 = _mm512_loadu_ps(row + j), e1 = _mm512_loadu_ps(row + j + kLanes);
    sum0 = _mm512_add_ps(sum0, e0);
    sum1 = _mm512_add_ps(sum1, e1);
    kept0 = _mm512_mask_add_ps(kept0, static_cast<__mmask16>(bits), kept0, e0);
    kept1 = _mm512_mask_add_ps(kept1, static_cast<__mmask16>(bits >> 16), kept1, e1);
  }
  for (; j < ld; j += kLanes) {
    const __mmask16 part = lanes_below(ld - j);
    const __m512 e = _mm512_maskz_loadu_ps(part, row + j);
    sum0 = _mm512_add_ps(sum0, e);
    kept0 = _mm512_mask_add_ps(kept0, static_cast<__mmask16>(bitmap[j / 64] >> (j % 64)) & part, kept0, e);
  }
  *total = _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
  *kept = _mm512_reduce_add_ps(_mm512_add_ps(kept0, kept1));
}

// Row i's fusion towards b(i) (mask words wi and wp) a vector at a time: part(bits, h, j)
// for each vector of a chunk's columns from column j, with bits the vector's moved columns
// and h the chunk's H times `scale`. A chunk of up to 16 columns is one vector; no branch
// skips a chunk with nothing to move (see avx2::fuse_row). The grid is taken by value:
// read through the caller's reference, its fields would be loaded again after each of
// part's stores, which might alias them.
template <typename Part>
__attribute__((always_inline)) inline void fusion_parts(const avx2::ChunkGrid g, const uint64_t* wi,
                                                        const uint64_t* wp, float scale, Part&& part) {
  if (g.omega <= kLanes) {  // every chunk one vector: a loop of its own, whose registers hold
    for (int64_t c = 0; c < g.chunks; ++c) {  // the grid (a shared loop spilled them)
      const avx2::FusionChunk chunk = avx2::fusion_chunk(g, wi, wp, c);
      part(_cvtu32_mask16(static_cast<uint32_t>(chunk.moved)), _mm512_set1_ps(scale * chunk.similarity), chunk.begin);
    }
    return;
  }
  for (int64_t c = 0; c < g.chunks; ++c) {
    const avx2::FusionChunk chunk = avx2::fusion_chunk(g, wi, wp, c);
    const __m512 h = _mm512_set1_ps(scale * chunk.similarity);
    uint64_t moved = chunk.moved;
    for (int64_t j = 0; j < chunk.size; j += kLanes, moved >>= kLanes)
      part(_cvtu32_mask16(static_cast<uint32_t>(moved)), h, chunk.begin + j);
  }
}

// avx2::fuse_row 16 lanes wide: the moved columns read and written under their bits
// (nothing past a chunk is touched).
float fuse_row(const avx2::ChunkGrid& g, const uint64_t* wi, const uint64_t* wp, float share, const float* source,
               float* target) {
  __m512 added = _mm512_setzero_ps();
  fusion_parts(g, wi, wp, share, [&](__mmask16 bits, __m512 h, int64_t j) {
    const __m512 value = _mm512_maskz_mul_ps(bits, h, _mm512_maskz_loadu_ps(bits, source + j));
    _mm512_mask_storeu_ps(target + j, bits, _mm512_add_ps(_mm512_maskz_loadu_ps(bits, target + j), value));
    added = _mm512_add_ps(added, value);
  });
  return _mm512_reduce_add_ps(added);
}

// avx2::probs_rows 16 lanes wide: the same operations, so the same values bit for bit.
void probs_rows(float* square, int64_t ld, int64_t n, const float* lse, int64_t row_begin, int64_t row_end) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t i = row_begin; i < row_end; ++i) {
    float* row = square + i * ld;
    const __m512 vlse = _mm512_set1_ps(i < n ? lse[i] : 0.0f);
    for (int64_t j = 0; j < ld; j += kLanes) {
      const __mmask16 part = lanes_below(ld - j);
      __m512 p = zero;
      if (i < n)
        p = _mm512_maskz_mov_ps(lanes_below(n - j),
                                exp512(_mm512_min_ps(zero, _mm512_sub_ps(_mm512_maskz_loadu_ps(part, row + j), vlse))));
      _mm512_mask_storeu_ps(row + j, part, p);
    }
  }
}

// avx2::fused_grad_row 16 lanes wide, grad_i read and written under the moved bits: the
// same values in grad_i, dρ_i summed in another order.
float fused_grad_row(const avx2::ChunkGrid& g, const uint64_t* wi, const uint64_t* wp, float rho,
                     const float* probs_i, const float* grad_target, float* grad_i) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 r = _mm512_set1_ps(rho);
  fusion_parts(g, wi, wp, 1.0f, [&](__mmask16 bits, __m512 h, int64_t j) {
    const __m512 h_gt = _mm512_maskz_mul_ps(bits, h, _mm512_maskz_loadu_ps(bits, grad_target + j));
    _mm512_mask_storeu_ps(grad_i + j, bits, _mm512_fmadd_ps(r, h_gt, _mm512_maskz_loadu_ps(bits, grad_i + j)));
    acc = _mm512_fmadd_ps(h_gt, _mm512_maskz_loadu_ps(bits, probs_i + j), acc);
  });
  return _mm512_reduce_add_ps(acc);
}

}  // namespace

const avx2::Products kProducts = {gemm,     sparse_rows, score_block,   kept_words,
                                  upper_exps, row_sums, fuse_row,    probs_rows, fused_grad_row};

}  // namespace bspf::cpu::avx512
