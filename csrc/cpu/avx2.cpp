// The AVX2+FMA CPU path for float32: SPEC §3 and §4 computed one (batch, head) pair at a
// time with its whole working set (an N×N tile of logits, ~160 KB at N = 197) in L2.
//
// Compiled with -mavx2 -mfma only, and chosen at run time by dispatch.cpp. To keep the
// portable path safe on CPUs without AVX2 this file uses no inline function or template
// shared with other translation units: no std:: containers or algorithms, no <cmath>
// overloads (compiler builtins instead), and of params.h only its plain structs.
//
// Where it differs from scalar.cpp (the correctness baseline), it differs only in
// rounding: dot products and sums are vectorised, so float32 scores may swap places at
// a near-tie of a block's k-th score (SPEC §6), exactly as any two float32
// implementations may. The selection rule itself (top k, ties to the smaller row-major
// index, NaN last) is the same.
#include <immintrin.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "kernels.h"

namespace bspf::cpu::avx2 {
namespace {

constexpr int64_t kLanes = 8;

constexpr float kCosEps = 1e-8f;  // cos(x, y) = x·y / max(‖x‖‖y‖, 1e-8)

inline int64_t round_up8(int64_t n) { return (n + 7) & ~int64_t{7}; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline uint64_t low_bits(int64_t n) { return n >= 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1; }

// ----------------------------------------------------------------- vector helpers

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int64_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// Lanes [0, n) all ones, the rest zero (n in [0, 8]).
inline __m256 lane_mask(int64_t n) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes));
}

// Lane l all ones where bit l of `bits` is set.
inline __m256 expand_bits(uint32_t bits) {
  const __m256i select = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i b = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), select);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, select));
}

// dst[0..round_up8(width)) = src[0..width) then zeros; reads nothing past src[width).
inline void copy_padded(const float* src, int64_t width, float* dst) {
  int64_t k = 0;
  for (; k + kLanes <= width; k += kLanes) _mm256_storeu_ps(dst + k, _mm256_loadu_ps(src + k));
  if (k < width) {
    const __m256i lanes = _mm256_castps_si256(lane_mask(width - k));
    _mm256_storeu_ps(dst + k, _mm256_maskload_ps(src + k, lanes));
  }
}

// dst[0..width) = src[0..width); writes nothing past dst[width).
inline void copy_exact(const float* src, int64_t width, float* dst) {
  int64_t k = 0;
  for (; k + kLanes <= width; k += kLanes) _mm256_storeu_ps(dst + k, _mm256_loadu_ps(src + k));
  if (k < width) _mm256_maskstore_ps(dst + k, _mm256_castps_si256(lane_mask(width - k)), _mm256_loadu_ps(src + k));
}

// exp(x) to about 2 ulp (measured over [-87, 88]); inputs below -88 give 0 or a value
// below 1e-38. Rounding to the nearest integer n = round(x · log2 e) by adding 1.5 · 2^23
// leaves n in the low mantissa bits, which become 2^n's exponent field directly; e^r on
// |r| ≤ ln2 / 2 is 1 + r + r² · q(r) with a degree-4 q fitted for relative error.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.0f));
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: n · hi is exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.357120811007917e-3f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.372687734663486e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.167356714606285e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666479408740997e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.9999967217445374e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float dot(const float* a, const float* b, int64_t padded_len) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= padded_len; k += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), acc1);
  }
  if (k < padded_len) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
  return hsum(_mm256_add_ps(acc0, acc1));
}

// dst (8×8, row stride ldd) = transpose of src (8×8, row stride lds).
inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int h = 0; h < 8; h += 4) {
    r[h + 0] = _mm256_shuffle_ps(t[h + 0], t[h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[h + 1] = _mm256_shuffle_ps(t[h + 0], t[h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// dst (cols×rows) = srcᵀ for src (rows×cols); rows and cols multiples of 8.
void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  for (int64_t i = 0; i < rows; i += 8)
    for (int64_t j = 0; j < cols; j += 8) transpose8(src + i * lds + j, lds, dst + j * ldd + i, ldd);
}

// ------------------------------------------------------------------- dense GEMM

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

// Rows [row_begin, row_end) (multiples of 4) of C = alpha · A·B, columns [col_begin(i0), cols)
// where col_begin is `upper ? i0 rounded down to 8 : 0`; cols is a multiple of 8.
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

// One row: out[0..64) = alpha · Σ_j coef[j] · B[j][0..64) over the columns j set in its
// bitmap (bw words), walked bit by bit: no column list goes through memory, which leaves
// L1 to B (measured 5-8% faster than a list). 8 accumulators hide the FMA latency.
inline void sparse_row64(const float* coef, const uint64_t* bitmap, int64_t bw, const float* b, int64_t ldb,
                         float* out, __m256 alpha) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  __m256 acc4 = acc0, acc5 = acc0, acc6 = acc0, acc7 = acc0;
  for (int64_t w = 0; w < bw; ++w)
    for (uint64_t bits = bitmap[w]; bits; bits &= bits - 1) {
      const int64_t j = w * 64 + __builtin_ctzll(bits);
      const __m256 s = _mm256_broadcast_ss(coef + j);
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
  const __m256 acc[8] = {acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7};
  for (int v = 0; v < 8; ++v) _mm256_storeu_ps(out + v * kLanes, _mm256_mul_ps(alpha, acc[v]));
}

// Whether sparse_rows reads the coefficients of pruned entries (which must then be 0):
// only the 64-wide path goes over each row's own kept columns (sparse_row64).
inline bool sparse_rows_reads_pruned(int64_t width) { return width != 64; }

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
                 int64_t ldo) {
  const int64_t stride = ld + kLanes;
  if (!sparse_rows_reads_pruned(width)) {
    // One row at a time over exactly its kept columns: no union overhead (~18% more
    // FMAs at keep 0.5).
    for (int64_t r = 0; r < rows; ++r)
      sparse_row64(coef + r * ldc, bitmaps + r * bw, bw, b, ldb, out + r * ldo, _mm256_set1_ps(alpha ? alpha[r] : 1.0f));
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

// Copies rows × width floats from a buffer with row stride lds to one with row stride ldd.
void copy_rows(const float* src, int64_t lds, int64_t rows, int64_t width, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) copy_exact(src + r * lds, width, dst + r * ldd);
}

// ---------------------------------------------------------------- geometry, memory

struct Geometry {
  int64_t n, d, dv;     // sizes
  int64_t omega, chunks, last;  // chunk size, count, size of the last chunk
  int64_t ld;           // N rounded up to 8: row stride of every N×N buffer
  int64_t dp, dvp;      // D and Dv rounded up to 8
  Geometry(const Problem& p)
      : n(p.seqlen), d(p.head_dim), dv(p.value_dim), omega(p.block_size),
        chunks((p.seqlen + p.block_size - 1) / p.block_size),
        last(p.seqlen - ((p.seqlen + p.block_size - 1) / p.block_size - 1) * p.block_size),
        ld(round_up8(p.seqlen)), dp(round_up8(p.head_dim)), dvp(round_up8(p.value_dim)) {
    for (int pc = 0; pc <= 64; ++pc) {
      similarity_full[pc] = 1.0f - static_cast<float>(pc) / static_cast<float>(omega);
      similarity_last[pc] = 1.0f - static_cast<float>(pc) / static_cast<float>(last);
    }
  }
  // H = 1 − popcount / |chunk| for each popcount, as the portable path computes it
  // (SPEC §3.6), so the fusion loop does no division.
  float similarity_full[65], similarity_last[65];
  int64_t begin(int64_t c) const { return c * omega; }
  int64_t size(int64_t c) const { return c == chunks - 1 ? last : omega; }
  float similarity(int64_t c, int popcount) const {
    return c == chunks - 1 ? similarity_last[popcount] : similarity_full[popcount];
  }
  int64_t square() const { return ld * ld + kLanes; }  // + slack: the score tiles read a vector past a row
};

// One 64-byte aligned array that grows on demand (contents are not kept when it grows).
template <typename T>
struct Array {
  T* data = nullptr;
  int64_t capacity = 0;
  Array() = default;
  Array(const Array&) = delete;
  Array& operator=(const Array&) = delete;
  ~Array() { std::free(data); }
  bool reserve(int64_t count) {
    if (count <= capacity) return true;
    std::free(data);
    const int64_t bytes = ((count * static_cast<int64_t>(sizeof(T)) + 63) / 64) * 64;
    data = static_cast<T*>(std::aligned_alloc(64, static_cast<size_t>(bytes)));
    capacity = data ? count : 0;
    if (data) std::memset(data, 0, static_cast<size_t>(bytes));  // slack past the rows stays finite
    return data != nullptr;
  }
};

// Copies one (b, h) slice of a strided (B, H, N, width) tensor into a dense rows×padded
// buffer, zero in the padding rows and columns.
void gather(const float* base, const int64_t* stride, int64_t pair, int64_t heads, int64_t n, int64_t width,
            int64_t rows, int64_t padded, float* dst) {
  const float* src = base + (pair / heads) * stride[0] + (pair % heads) * stride[1];
  for (int64_t i = 0; i < rows; ++i) {
    float* row = dst + i * padded;
    if (i >= n) {
      for (int64_t k = 0; k < padded; k += kLanes) _mm256_storeu_ps(row + k, _mm256_setzero_ps());
      continue;
    }
    const float* s = src + i * stride[2];
    if (stride[3] == 1) {
      copy_padded(s, width, row);
    } else {
      for (int64_t k = 0; k < width; ++k) row[k] = s[k * stride[3]];
      for (int64_t k = width; k < padded; ++k) row[k] = 0.0f;
    }
  }
}

}  // namespace

// Scratch of one thread. Members sized per call by reserve().
struct Workspace {
  Array<float> x, xt, v, vt, g, dx, dv;        // X, Xᵀ, V, Vᵀ, dOut, dX, dV (padded rows)
  Array<float> logits, weights, grad, work;    // ld×ld squares
  Array<float> tile, small, out_row, column;
  Array<int32_t> keys, lists;
  Array<uint64_t> bitmap;
};

namespace {

// ------------------------------------------------------------------------ logits

// Which lower 8×8 tiles of L a caller reads: none (the mask reads upper blocks only), those
// that share a token chunk with their row (the forward's matching reads the diagonal
// blocks), or all (the backward).
enum class Mirror { kNone, kDiagonalBlocks, kAll };

// L = scale · X Xᵀ over the ld×ld square: upper 8×8 tiles by GEMM, the lower ones the
// caller reads mirrored (QQᵀ is symmetric). Padding rows/columns come out 0 since X's
// padding rows are 0.
void compute_logits(const Geometry& g, const float* x, const float* xt, float scale, Mirror mirror, float* logits) {
  gemm(x, g.dp, xt, g.ld, g.d, logits, g.ld, g.ld, g.ld, scale, /*upper=*/true);
  if (mirror == Mirror::kNone) return;
  for (int64_t i = 8; i < g.ld; i += 8)
    for (int64_t j = 0; j < i; j += 8) {
      // Rows [i, i + 8) start in chunk i / Ω, columns [j, j + 8) end in chunk (j + 7) / Ω.
      const bool diagonal_block = i / g.omega <= (j + 7) / g.omega;
      if (mirror == Mirror::kAll || diagonal_block)
        transpose8(logits + j * g.ld + i, g.ld, logits + i * g.ld + j, g.ld);
    }
}

// Row i of L = scale · X Xᵀ recomputed from X (padded rows, 0 past N) into `row` (ld
// floats), for the forward, whose logits tile has become E by then.
void logit_row(const Geometry& g, const float* x, float scale, int64_t i, float* row) {
  for (int64_t j = 0; j < g.ld; ++j) row[j] = scale * dot(x + i * g.dp, x + j * g.dp, g.dp);
}

// --------------------------------------------------------------------- keep mask

// Float → int32 whose signed order is the float order; -0 counts as +0 and NaN as -inf
// (NaN ranks last, as in the portable path).
inline __m256i order_key(__m256 s) {
  s = _mm256_add_ps(s, _mm256_setzero_ps());  // -0 + 0 = +0
  s = _mm256_blendv_ps(_mm256_set1_ps(-__builtin_inff()), s, _mm256_cmp_ps(s, s, _CMP_ORD_Q));
  const __m256i bits = _mm256_castps_si256(s);
  const __m256i flip = _mm256_and_si256(_mm256_srai_epi32(bits, 31), _mm256_set1_epi32(0x7FFFFFFF));
  return _mm256_xor_si256(bits, flip);
}

// How many of `count` keys are ≥ threshold.
inline int64_t count_at_least(const int32_t* keys, int64_t count, int32_t threshold) {
  const __m256i t = _mm256_set1_epi32(threshold);
  __m256i below0 = _mm256_setzero_si256(), below1 = _mm256_setzero_si256();
  int64_t e = 0;
  for (; e + 16 <= count; e += 16) {
    const __m256i k0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + e));
    const __m256i k1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + e + 8));
    below0 = _mm256_sub_epi32(below0, _mm256_cmpgt_epi32(t, k0));
    below1 = _mm256_sub_epi32(below1, _mm256_cmpgt_epi32(t, k1));
  }
  if (e < count)
    below0 = _mm256_sub_epi32(
        below0, _mm256_cmpgt_epi32(t, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + e))));
  return count - hsum_epi32(_mm256_add_epi32(below0, below1));
}

inline int32_t hmin_epi32(__m256i v) {
  __m128i s = _mm_min_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_min_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_min_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

inline int32_t hmax_epi32(__m256i v) {
  __m128i s = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_max_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_max_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// order_key for one float, and back (for keys of finite floats).
inline int32_t key_of(float value) {
  value += 0.0f;  // -0 → +0
  int32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits < 0 ? bits ^ 0x7FFFFFFF : bits;
}
inline float value_of(int32_t key) {
  const int32_t bits = key < 0 ? key ^ 0x7FFFFFFF : key;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// Where the k-th largest of n scores sits, in standard deviations from their mean, if
// they were normally distributed: Φ⁻¹(1 − (k − ½) / n), by Acklam's rational
// approximation (relative error ~1e-9, far more than a first guess needs).
double normal_quantile_of_rank(int64_t k, int64_t n) {
  const double p = 1.0 - (static_cast<double>(k) - 0.5) / static_cast<double>(n);
  static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                             1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00};
  static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                             6.680131188771972e+01, -1.328068155288572e+01};
  static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                             -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00};
  static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                             3.754408661907416e+00};
  if (p <= 0.0) return -8.0;
  if (p >= 1.0) return 8.0;
  if (p < 0.02425 || p > 1.0 - 0.02425) {
    const double q = __builtin_sqrt(-2.0 * __builtin_log(p < 0.5 ? p : 1.0 - p));
    const double x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
                     ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0);
    return p < 0.5 ? x : -x;
  }
  const double q = p - 0.5, r = q * q;
  return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
         (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0);
}

// The keep rule's k of a block and where its k-th score is expected (see select_block).
struct BlockRank {
  int64_t k = 0;
  double z = 0.0;        // normal_quantile_of_rank(k, block entries)
  double density = 0.0;  // φ(z): the normal density there, per standard deviation
};

BlockRank block_rank(int64_t k, int64_t entries) {
  BlockRank rank;
  rank.k = k;
  if (k > 0 && k < entries) {
    rank.z = normal_quantile_of_rank(k, entries);
    rank.density = 0.3989422804014327 * __builtin_exp(-0.5 * rank.z * rank.z);
  }
  return rank;
}

// Looks for the k-th largest of `real` keys (the others are padding) by searching the
// score values between the smallest and largest key. Scores are smooth and roughly bell
// shaped, so the first probe is where a normal distribution of their mean and standard
// deviation puts the k-th largest, the second a Newton step on that model's count; after
// that, interpolation on the counts within the bracket found so far, with a bisection
// whenever an interpolation step fails to halve the bracket. Six passes over the keys on
// average land between the k-th and the (k+1)-th at the target shape (eight from the
// bracket [min, max] alone); the bisections bound the bad cases.
//
// On success *threshold is either a key with exactly k keys at or above it (*at_least =
// k), or the k-th largest key itself (ties at it; *at_least > k). Returns false, to fall
// back on the bisection over key bits, when a score is not finite or the search runs long.
bool search_by_value(const int32_t* keys, int64_t count, int64_t real, const BlockRank& rank, double mean,
                     double deviation, int32_t lowest_key, int32_t highest_key, int32_t* threshold,
                     int64_t* at_least) {
  const int64_t k = rank.k;
  const float lowest = value_of(lowest_key), highest = value_of(highest_key);
  const float inf = __builtin_inff();
  if (!(lowest > -inf && highest < inf)) return false;  // also NaN, which ranks as -inf
  if (real <= k) return false;
  double lo = lowest, hi = highest;  // count(≥ lo) = c_lo ≥ k; count(≥ hi) = c_hi, < k unless lo = hi
  int64_t c_lo = real, c_hi = count_at_least(keys, count, highest_key);
  if (c_hi >= k) {  // the maximum itself is the k-th largest (ties at the top)
    *threshold = highest_key;
    *at_least = c_hi;
    return true;
  }
  const bool model = deviation > 0.0 && rank.density > 0.0 && deviation < 1e30;
  double last_width = hi - lo;
  for (int step = 0; step < 24; ++step) {
    double t;
    if (step == 0 && model) {
      t = mean + rank.z * deviation;
    } else if (step == 1 && model) {
      // Newton on the model's count, from whichever end of the bracket the first probe set.
      const double probe = c_lo > k ? lo : hi, c = c_lo > k ? c_lo : c_hi;
      t = probe + (c - static_cast<double>(k)) * deviation / (static_cast<double>(real) * rank.density);
    } else if (hi - lo <= 0.5 * last_width) {
      t = lo + (hi - lo) * ((static_cast<double>(c_lo - k) - 0.5) / static_cast<double>(c_lo - c_hi));
    } else {
      t = lo + (hi - lo) * 0.5;
    }
    last_width = hi - lo;
    float candidate = static_cast<float>(t);
    if (!(candidate > static_cast<float>(lo) && candidate < static_cast<float>(hi))) {
      candidate = static_cast<float>(lo + (hi - lo) * 0.5);
      if (!(candidate > static_cast<float>(lo) && candidate < static_cast<float>(hi))) {
        // lo and hi are adjacent floats: lo is the k-th largest score.
        *threshold = key_of(static_cast<float>(lo));
        *at_least = c_lo;
        return true;
      }
    }
    const int32_t key = key_of(candidate);
    const int64_t c = count_at_least(keys, count, key);
    if (c == k) {
      *threshold = key;
      *at_least = k;
      return true;
    }
    if (c > k) {
      lo = candidate;
      c_lo = c;
    } else {
      hi = candidate;
      c_hi = c;
    }
  }
  return false;
}

// Scores one upper block (SPEC §3.2: 3×3 conv of its logits, zero outside the block),
// keeps its k best (§3.3) and returns the kept bits per row in `row_bits` and per column
// (the mirrored block's rows) in `col_bits`.
//
// Selection is a bisection on the order keys for the k-th largest, without sorting: the
// kept set is every key above it plus, among keys equal to it, the first ones in
// row-major order. It stops early once some threshold splits off exactly k entries.
void select_block(const Geometry& g, const float* logits, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                  const float* kernel, const BlockRank& rank, Workspace& ws, uint64_t* row_bits, uint64_t* col_bits) {
  const int64_t k = rank.k;
  const int64_t ts = round_up8(cols + 2) + kLanes;  // padded tile row: zero, cols values, zeros
  const int64_t sp = round_up8(cols);               // key row stride
  float* tile = ws.tile.data;
  int32_t* keys = ws.keys.data;
  const __m256 zero = _mm256_setzero_ps();

  std::memset(tile, 0, sizeof(float) * ts);
  std::memset(tile + (rows + 1) * ts, 0, sizeof(float) * ts);
  for (int64_t i = 0; i < rows; ++i) {
    float* t = tile + (i + 1) * ts;
    const float* src = logits + (r0 + i) * g.ld + c0;
    t[0] = 0.0f;
    for (int64_t j = 0; j < cols; j += kLanes) _mm256_storeu_ps(t + 1 + j, _mm256_loadu_ps(src + j));
    _mm256_storeu_ps(t + 1 + cols, zero);  // what the last vector copied past the block
  }

  __m256 w[9];
  for (int e = 0; e < 9; ++e) w[e] = _mm256_set1_ps(kernel[e]);
  const __m256i padding = _mm256_set1_epi32(INT_MIN);  // below every real key
  __m256i lowest = _mm256_set1_epi32(INT_MAX), highest = padding;
  __m256 sum = zero, sum_squares = zero;  // of the scores: the search's first guess
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < sp; j += kLanes) {
      __m256 s = _mm256_mul_ps(w[0], _mm256_loadu_ps(tile + i * ts + j));
      for (int e = 1; e < 9; ++e)
        s = _mm256_fmadd_ps(w[e], _mm256_loadu_ps(tile + (i + e / 3) * ts + j + e % 3), s);
      __m256i key = order_key(s);
      highest = _mm256_max_epi32(highest, key);
      if (j + kLanes > cols) {
        const __m256 real = lane_mask(cols - j);
        const __m256i real_i = _mm256_castps_si256(real);
        lowest = _mm256_min_epi32(lowest, _mm256_blendv_epi8(_mm256_set1_epi32(INT_MAX), key, real_i));
        key = _mm256_blendv_epi8(padding, key, real_i);
        s = _mm256_and_ps(s, real);
      } else {
        lowest = _mm256_min_epi32(lowest, key);
      }
      sum = _mm256_add_ps(sum, s);
      sum_squares = _mm256_fmadd_ps(s, s, sum_squares);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + i * sp + j), key);
    }
  const double entries = static_cast<double>(rows * cols);
  const double mean = hsum(sum) / entries;
  const double variance = hsum(sum_squares) / entries - mean * mean;
  const double deviation = variance > 0.0 ? __builtin_sqrt(variance) : 0.0;  // 0 (no model) for NaN too

  const int64_t rp = round_up8(rows);
  for (int64_t i = rows; i < rp; ++i)
    for (int64_t j = 0; j < sp; j += kLanes) _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + i * sp + j), padding);

  const int64_t count = rp * sp;
  int32_t threshold = 0;
  int64_t at_least = 0;
  if (!search_by_value(keys, count, rows * cols, rank, mean, deviation, hmin_epi32(lowest), hmax_epi32(highest),
                       &threshold, &at_least)) {
    // Bisection in unsigned key space (u = key ^ 2^31): the largest u with ≥ k keys at or above it.
    uint32_t u = 0;
    at_least = count;
    for (int bit = 31; bit >= 0 && at_least != k; --bit) {
      const uint32_t candidate = u | (uint32_t{1} << bit);
      const int64_t c = count_at_least(keys, count, static_cast<int32_t>(candidate ^ 0x80000000u));
      if (c >= k) {
        u = candidate;
        at_least = c;
      }
    }
    threshold = static_cast<int32_t>(u ^ 0x80000000u);
  }
  if (at_least == k) {
    // Exactly the keys ≥ threshold (> INT_MIN, so padding never counts). The mirror's
    // bits come from the same test on the transposed keys.
    const __m256i below = _mm256_set1_epi32(threshold - 1);
    auto bits_of = [&](const int32_t* row, int64_t width) {
      uint64_t bits = 0;
      for (int64_t j = 0; j < width; j += kLanes) {
        const __m256i key = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j));
        bits |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, below)))) << j;
      }
      return bits;
    };
    for (int64_t i = 0; i < rows; ++i) row_bits[i] = bits_of(keys + i * sp, sp);
    int32_t* keys_t = keys + 64 * 64;
    const float* kf = reinterpret_cast<const float*>(keys);
    transpose(kf, sp, rp, sp, reinterpret_cast<float*>(keys_t), rp);
    for (int64_t j = 0; j < cols; ++j) col_bits[j] = bits_of(keys_t + j * rp, rp);
    return;
  }
  // Ties at the k-th key: keys above it, then equal ones in row-major order.
  // #(key > threshold) = #(key ≥ threshold + 1); threshold < INT_MAX since it is a real key.
  const __m256i t = _mm256_set1_epi32(threshold);
  int64_t need = k - count_at_least(keys, count, threshold + 1);
  for (int64_t i = 0; i < rows; ++i) {
    uint64_t greater = 0, equal = 0;
    for (int64_t j = 0; j < sp; j += kLanes) {
      const __m256i key = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i * sp + j));
      greater |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, t)))) << j;
      equal |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(key, t)))) << j;
    }
    for (; need > 0 && equal; --need) {
      greater |= equal & (~equal + 1);  // lowest set bit
      equal &= equal - 1;
    }
    row_bits[i] = greater;
  }
  for (int64_t j = 0; j < cols; ++j) col_bits[j] = 0;
  for (int64_t i = 0; i < rows; ++i)
    for (uint64_t b = row_bits[i]; b; b &= b - 1) col_bits[__builtin_ctzll(b)] |= uint64_t{1} << i;
}

// SPEC §3.3 for one pair: diagonal blocks full, upper blocks selected, mirrored below.
void compute_mask_words(const Geometry& g, const float* logits, const float* kernel, const KeepCounts& keep,
                        Workspace& ws, uint64_t* words) {
  const int64_t C = g.chunks;
  std::memset(words, 0, sizeof(uint64_t) * g.n * C);
  for (int64_t m = 0; m < C; ++m)
    for (int64_t i = g.begin(m); i < g.begin(m) + g.size(m); ++i) words[i * C + m] = low_bits(g.size(m));
  uint64_t row_bits[64], col_bits[64];
  // Upper blocks have full rows; their columns are full or the last chunk.
  const BlockRank full = block_rank(keep.full, g.omega * g.omega), tail = block_rank(keep.tail, g.omega * g.last);
  for (int64_t m = 0; m + 1 < C; ++m) {
    const int64_t r0 = g.begin(m), rows = g.size(m);
    for (int64_t bn = m + 1; bn < C; ++bn) {
      const int64_t c0 = g.begin(bn), cols = g.size(bn);
      const BlockRank& rank = bn == C - 1 ? tail : full;
      if (rank.k <= 0) continue;
      if (rank.k >= rows * cols) {
        for (int64_t i = 0; i < rows; ++i) row_bits[i] = low_bits(cols);
        for (int64_t j = 0; j < cols; ++j) col_bits[j] = low_bits(rows);
      } else {
        select_block(g, logits, r0, rows, c0, cols, kernel, rank, ws, row_bits, col_bits);
      }
      for (int64_t i = 0; i < rows; ++i) words[(r0 + i) * C + bn] = row_bits[i];
      for (int64_t j = 0; j < cols; ++j) words[(c0 + j) * C + m] = col_bits[j];
    }
  }
}

// ---------------------------------------------------------------------- matching

// SPEC §3.5: b(i) and ρ_i within each chunk; the same comparisons as the portable path.
// The chunk's Gram matrix is its diagonal block of L divided by the scale (L = scale · X Xᵀ
// is already computed): equal to the dot products up to one rounding, and exact when the
// scale is a power of two. A zero, tiny, huge or non-finite scale recomputes the dot products.
void compute_match(const Geometry& g, const float* x, const float* logits, float scale, Workspace& ws,
                   int32_t* match, float* rho) {
  float* norm = ws.small.data;        // 64 + 8: padding lanes stay finite
  float* cosines = ws.small.data + 72;  // 64
  float* gram = ws.small.data + 136;  // 64×64
  const float magnitude = __builtin_fabsf(scale);
  const bool from_logits = magnitude >= 0x1p-60f && magnitude <= 0x1p60f;
  const __m256 vscale = _mm256_set1_ps(scale), eps = _mm256_set1_ps(kCosEps);
  const __m256 neg_inf = _mm256_set1_ps(-__builtin_inff());
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t c = 0; c < g.chunks; ++c) {
    const int64_t b0 = g.begin(c), size = g.size(c), width = round_up8(size);
    for (int64_t a = 0; a < size; ++a) {
      float* ga = gram + a * 64;
      if (from_logits) {
        const float* la = logits + (b0 + a) * g.ld + b0;  // reads past the block stay inside the square
        for (int64_t b = 0; b < width; b += kLanes) _mm256_storeu_ps(ga + b, _mm256_div_ps(_mm256_loadu_ps(la + b), vscale));
        norm[a] = __builtin_sqrtf(ga[a]);
      } else {
        const float* xa = x + (b0 + a) * g.dp;
        norm[a] = __builtin_sqrtf(dot(xa, xa, g.dp));
        for (int64_t b = 0; b < size; ++b) ga[b] = dot(xa, x + (b0 + b) * g.dp, g.dp);
      }
    }
    for (int64_t b = size; b < width; ++b) norm[b] = 0.0f;
    for (int64_t a = 0; a < size; ++a) {
      const float* ga = gram + a * 64;
      const __m256 na = _mm256_set1_ps(norm[a]);
      __m256 best_v = neg_inf, unordered = _mm256_setzero_ps();
      for (int64_t b = 0; b < width; b += kLanes) {
        const __m256 prod = _mm256_mul_ps(na, _mm256_loadu_ps(norm + b));
        const __m256 den = _mm256_blendv_ps(prod, eps, _mm256_cmp_ps(prod, eps, _CMP_LT_OQ));
        __m256 cos = _mm256_div_ps(_mm256_loadu_ps(ga + b), den);
        const __m256i index = _mm256_add_epi32(lanes, _mm256_set1_epi32(static_cast<int>(b)));
        const __m256 other = _mm256_castsi256_ps(_mm256_andnot_si256(
            _mm256_cmpeq_epi32(index, _mm256_set1_epi32(static_cast<int>(a))),
            _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(size)), index)));
        unordered = _mm256_or_ps(unordered, _mm256_and_ps(other, _mm256_cmp_ps(cos, cos, _CMP_UNORD_Q)));
        cos = _mm256_blendv_ps(neg_inf, cos, other);
        _mm256_storeu_ps(cosines + b, cos);
        best_v = _mm256_max_ps(best_v, cos);
      }
      const float top = hmax(best_v);
      int64_t best = a;
      float best_cos = -__builtin_inff();
      if (size > 1 && !_mm256_movemask_ps(unordered) && top > -__builtin_inff()) {
        // The first b reaching the maximum: the portable path's strict comparison.
        const __m256 vt = _mm256_set1_ps(top);
        for (int64_t b = 0; b < width; b += kLanes) {
          const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(cosines + b), vt, _CMP_EQ_OQ));
          if (hit) {
            best = b + __builtin_ctz(static_cast<unsigned>(hit));
            break;
          }
        }
        best_cos = cosines[best];
      } else {
        // NaN or -inf cosines: the portable path's loop, comparison for comparison.
        for (int64_t b = 0; b < size; ++b) {
          if (b == a) continue;
          const float prod = norm[a] * norm[b];
          const float cos = ga[b] / (prod < kCosEps ? kCosEps : prod);
          if (best == a || cos > best_cos) {  // strict: the smaller index keeps a tie
            best = b;
            best_cos = cos;
          }
        }
      }
      match[b0 + a] = static_cast<int32_t>(b0 + best);
      rho[b0 + a] = best == a ? 0.0f : (best_cos < 0.0f ? 0.0f : best_cos);
    }
  }
}

// ---------------------------------------------------------------- probabilities

// exp(row − shift) in place, 0 in the padding: a row of P from its saved lse (the
// backward), or a forward row with its own maximum (row_shifted_exps).
//
// log P <= 0, but at logits of 1e8 float32's rounding of L and lse can put L above lse
// by tens: the exponent is capped at 0 (a NaN stays NaN: min_ps returns its second
// operand when either is NaN).
void probs_row(const Geometry& g, float* row, float lse) {
  const __m256 vlse = _mm256_set1_ps(lse), zero = _mm256_setzero_ps();
  for (int64_t j = 0; j < g.ld; j += kLanes) {
    __m256 p = exp256(_mm256_min_ps(zero, _mm256_sub_ps(_mm256_loadu_ps(row + j), vlse)));
    if (j + kLanes > g.n) p = _mm256_and_ps(p, lane_mask(g.n - j));
    _mm256_storeu_ps(row + j, p);
  }
}

// A shift no logit exceeds: |L_ij| = |scale · x_i·x_j| ≤ |scale| · max_k ‖x_k‖² = max_k |L_kk|
// (Cauchy–Schwarz), up to a rounding that exp does not mind. Not finite when X is not.
float logit_bound(const Geometry& g, const float* logits) {
  float bound = 0.0f;
  for (int64_t i = 0; i < g.n; ++i) {
    const float diagonal = __builtin_fabsf(logits[i * g.ld + i]);
    bound = diagonal > bound || diagonal != diagonal ? diagonal : bound;
  }
  return bound;
}

// The ld×ld square L becomes E = exp(L − shift) in place, 0 in the padding rows and
// columns (one square, not two: at N = 577 each is 1.4 MB of a 2 MB L2). With one shift
// for every row E is symmetric like L: only the upper 8×8 tiles are exponentiated (all
// that is read of L), the lower ones mirrored, so half the exps of a row-by-row softmax,
// and no row maxima.
void shifted_exps(const Geometry& g, float shift, float* square) {
  const __m256 vshift = _mm256_set1_ps(shift);
  for (int64_t i = 0; i < g.ld; ++i) {
    const float* l = square + i * g.ld;
    float* e = square + i * g.ld;
    for (int64_t j = i & ~int64_t{7}; j < g.ld; j += kLanes) {
      __m256 v = _mm256_setzero_ps();
      if (i < g.n) {
        v = exp256(_mm256_sub_ps(_mm256_loadu_ps(l + j), vshift));
        if (j + kLanes > g.n) v = _mm256_and_ps(v, lane_mask(g.n - j));
      }
      _mm256_storeu_ps(e + j, v);
    }
  }
  for (int64_t i = 8; i < g.ld; i += 8)
    for (int64_t j = 0; j < i; j += 8) transpose8(square + j * g.ld + i, g.ld, square + i * g.ld + j, g.ld);
}

// Row i of E with the row's own maximum as its shift, for the rows whose sum under the
// common shift is too small for float32 (a token of small norm beside one of large norm)
// or not finite: L_i recomputed from X into `row`, then E_i = exp(L_i − max_i) in place,
// 0 in the padding. Returns max_i.
float row_shifted_exps(const Geometry& g, const float* x, float scale, int64_t i, float* row) {
  logit_row(g, x, scale, i, row);
  const int64_t full = g.n / kLanes * kLanes;
  const __m256 neg_inf = _mm256_set1_ps(-__builtin_inff());
  __m256 mx = neg_inf;
  for (int64_t j = 0; j < full; j += kLanes) mx = _mm256_max_ps(mx, _mm256_loadu_ps(row + j));
  if (full < g.n) mx = _mm256_max_ps(mx, _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(row + full), lane_mask(g.n - full)));
  const float row_max = hmax(mx);
  probs_row(g, row, row_max);
  return row_max;
}

// A row's mask words as one bit per column, so that 8 columns are one byte.
void row_bitmap(const Geometry& g, const uint64_t* row_words, uint64_t* bitmap) {
  const int64_t count = g.ld / 64 + 1;
  for (int64_t w = 0; w < count; ++w) bitmap[w] = 0;
  for (int64_t c = 0; c < g.chunks; ++c) {
    const int64_t at = g.begin(c), shift = at % 64;
    const uint64_t word = row_words[c];
    bitmap[at / 64] |= word << shift;
    if (shift + g.size(c) > 64) bitmap[at / 64 + 1] |= word >> (64 - shift);
  }
}

inline uint32_t bitmap_byte(const uint64_t* bitmap, int64_t j) {  // bits of columns [j, j + 8), j % 8 == 0
  return static_cast<uint32_t>(bitmap[j / 64] >> (j % 64)) & 0xFFu;
}

// Calls fn(j, similarity) for every pruned entry (i, j) whose target (b(i), j) is kept
// (SPEC §3.6–3.7), as the portable path does.
template <typename Fn>
inline void for_each_fused_entry(const Geometry& g, int64_t i, const uint64_t* words, const int32_t* match,
                                 const float* rho, Fn&& fn) {
  const int64_t C = g.chunks, p = match[i];
  if (p == i || !(rho[i] > 0.0f)) return;
  const int64_t own = i / g.omega;
  for (int64_t c = 0; c < C; ++c) {
    if (c == own) continue;
    const uint64_t wi = words[i * C + c], wp = words[p * C + c];
    uint64_t moved = ~wi & wp & low_bits(g.size(c));
    if (!moved) continue;
    const float similarity = g.similarity(c, __builtin_popcountll(wi ^ wp));
    for (; moved; moved &= moved - 1) fn(g.begin(c) + __builtin_ctzll(moved), similarity);
  }
}

inline int64_t bitmap_words(const Geometry& g) { return g.ld / 64 + 1; }

// Row i moves share · H · source(j) to row b(i) on the columns j it prunes and b(i) keeps
// (SPEC §3.7; its own chunk is kept by both rows, so it never moves), one column chunk at
// a time (H is constant per chunk), 8 columns per step under the chunk's moved bits.
// Returns the sum added to `target`.
//
// A chunk's last vector reaches past it (into the next chunk, the padding, or for a short
// last chunk the next row's first columns) with its bits 0 there, so it adds +0 to
// values ≥ 0 and changes nothing; rows have a vector of slack at the square's end.
float fuse_row(const Geometry& g, const uint64_t* wi, const uint64_t* wp, float share, const float* source,
               float* target) {
  __m256 added = _mm256_setzero_ps();
  const int64_t chunks = g.chunks;
  for (int64_t c = 0; c < chunks; ++c) {
    uint64_t moved = ~wi[c] & wp[c];
    if (!moved) continue;  // its own chunk, and any other whose moved set is empty
    const __m256 h = _mm256_set1_ps(share * g.similarity(c, __builtin_popcountll(wi[c] ^ wp[c])));
    const int64_t begin = g.begin(c), size = g.size(c);
    for (int64_t j = 0; j < size; j += kLanes, moved >>= 8) {  // a fixed count: predictable
      const __m256 value = _mm256_and_ps(expand_bits(static_cast<uint32_t>(moved) & 0xFFu),
                                         _mm256_mul_ps(h, _mm256_loadu_ps(source + begin + j)));
      _mm256_storeu_ps(target + begin + j, _mm256_add_ps(_mm256_loadu_ps(target + begin + j), value));
      added = _mm256_add_ps(added, value);
    }
  }
  return hsum(added);
}

// Rows of chunk m of R = P ⊙ M + F (SPEC §3.8) into `weights` (row r = token begin(m) + r)
// and their sums Z into row_sum[r] (the backward, from P). Fusion stays inside the chunk
// (b(i) is in it). Scratch: `bitmaps` holds Ω · bitmap_words(g) words.
void chunk_weights(const Geometry& g, int64_t m, const float* probs, const uint64_t* words, const int32_t* match,
                   const float* rho, bool fuse, uint64_t* bitmaps, float* weights, float* row_sum) {
  const int64_t r0 = g.begin(m), rows = g.size(m), bw = bitmap_words(g);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r0 + r;
    uint64_t* bitmap = bitmaps + r * bw;
    row_bitmap(g, words + i * g.chunks, bitmap);
    const float* p = probs + i * g.ld;
    float* w = weights + r * g.ld;
    __m256 sum = _mm256_setzero_ps();
    uint64_t bits = 0;
    for (int64_t j = 0; j < g.ld; j += kLanes) {
      if (j % 64 == 0) bits = bitmap[j / 64];
      const __m256 kept = _mm256_and_ps(expand_bits(static_cast<uint32_t>(bits) & 0xFFu), _mm256_loadu_ps(p + j));
      bits >>= 8;
      _mm256_storeu_ps(w + j, kept);
      sum = _mm256_add_ps(sum, kept);
    }
    row_sum[r] = hsum(sum);
  }
  if (!fuse) return;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r0 + r, target_row = match[i] - r0;
    if (target_row == r || !(rho[i] > 0.0f)) continue;
    row_sum[target_row] += fuse_row(g, words + i * g.chunks, words + match[i] * g.chunks, rho[i], probs + i * g.ld,
                                    weights + target_row * g.ld);
  }
}

// Below this a row's sum of exps under the common shift is refused: the row's maximum is
// then more than 40 − ln N below the shift, and its entries near the maximum would come
// closer than e^-35 to float32's smallest normal number. Above it, whatever underflows
// weighs less than e^-35 of the row, far below float32's resolution of the sum.
constexpr float kSmallestSum = 4.24835426e-18f;  // e^-40

// A row of the forward is trusted when what float32 may have lost of it is below this
// fraction of its sum (2^-24, float32's unit roundoff).
constexpr float kResolution = 5.96046448e-8f;

// The backward forms A = R / Z and dR = (…) / Z from P = exp(L − lse) in linear space: exact
// enough while Z_i >= e^-41 (what underflows of P then weighs under 1e-20 of Z_i, and 1 / Z_i
// is far from overflow). A pair with a smaller Z_i goes to the portable path.
constexpr float kSmallestLogRowSum = -41.0f;

// The forward's rows of chunk m, in place in E (see shifted_exps). With P_i = E_i / T_i and
// T_i = Σ_j E_i(j), row i becomes R'_i = T_i · R_i on its kept entries: E_i plus the
// fusion of SPEC §3.7 in the row's own units. Its pruned entries keep E_i (the fusion reads
// them; A·V skips them). Then A_i = alpha_i · R'_i with alpha_i = 1 / Σ_j R'_i(j). A row
// whose T_i is too small or not finite is recomputed from X (rows, `scale`) with its own
// maximum as the shift. Saves lse_i and log Z_i. Scratch: `bitmaps` holds
// Ω · bitmap_words(g) words (left holding the rows' masks).
//
// Returns false when some row cannot be trusted in float32 this way (see kResolution), and
// the pair must go to the portable path, which works in log space.
bool chunk_forward_rows(const Geometry& g, int64_t m, const float* x, float scale, float shift, float* exps,
                        const uint64_t* words, const int32_t* match, const float* rho, bool fuse, uint64_t* bitmaps,
                        float* lse, float* log_row_sum, float* alpha) {
  const int64_t r0 = g.begin(m), rows = g.size(m), bw = bitmap_words(g);
  float total[64], kept[64], lost[64];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r0 + r;
    uint64_t* bitmap = bitmaps + r * bw;
    row_bitmap(g, words + i * g.chunks, bitmap);
    float* row = exps + i * g.ld;
    float row_shift = shift;
    for (int attempt = 0; attempt < 2; ++attempt) {
      __m256 sum = _mm256_setzero_ps(), kept_sum = sum;
      uint64_t bits = 0;
      for (int64_t j = 0; j < g.ld; j += kLanes) {
        if (j % 64 == 0) bits = bitmap[j / 64];
        const __m256 e = _mm256_loadu_ps(row + j);
        sum = _mm256_add_ps(sum, e);
        kept_sum = _mm256_add_ps(kept_sum, _mm256_and_ps(expand_bits(static_cast<uint32_t>(bits) & 0xFFu), e));
        bits >>= 8;
      }
      total[r] = hsum(sum);
      kept[r] = hsum(kept_sum);
      if (total[r] >= kSmallestSum && total[r] <= __FLT_MAX__) break;
      row_shift = row_shifted_exps(g, x, scale, i, row);
    }
    lse[r] = row_shift + __builtin_logf(total[r]);
    lost[r] = 1.0f;
  }
  if (fuse) {
    // In place: a row's fused-into entries are ones it keeps, its fused-out entries ones it prunes.
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = r0 + r, target_row = match[i] - r0;
      if (target_row == r || !(rho[i] > 0.0f)) continue;
      const float share = rho[i] * (total[target_row] / total[r]);
      kept[target_row] += fuse_row(g, words + i * g.chunks, words + match[i] * g.chunks, share, exps + i * g.ld,
                                   exps + match[i] * g.ld);
      lost[target_row] += share;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    // An entry of E below float32's smallest normal number is lost: at most N per row that
    // adds into row r, each weighing under FLT_MIN · (1 for the row itself, share for a
    // fused row) in row r's units. Once that can reach kResolution of the row's sum (all
    // its kept entries far below its maximum: extreme logits), or the sum is not finite,
    // this path is not exact enough.
    if (!(kept[r] * kResolution >= lost[r] * static_cast<float>(g.n) * __FLT_MIN__) || !(kept[r] <= __FLT_MAX__))
      return false;
    log_row_sum[r] = __builtin_logf(kept[r]) - __builtin_logf(total[r]);
    alpha[r] = 1.0f / kept[r];
  }
  return true;
}

// Zeroes the pruned entries of rows of chunk m of E (their masks in `bitmaps`).
void zero_pruned(const Geometry& g, int64_t m, const uint64_t* bitmaps, float* exps) {
  const int64_t bw = bitmap_words(g);
  for (int64_t r = 0; r < g.size(m); ++r) {
    float* row = exps + (g.begin(m) + r) * g.ld;
    for (int64_t j = 0; j < g.ld; j += kLanes) {
      const __m256 kept = expand_bits(bitmap_byte(bitmaps + r * bw, j));
      _mm256_storeu_ps(row + j, _mm256_and_ps(kept, _mm256_loadu_ps(row + j)));
    }
  }
}

// ---------------------------------------------------------------- pair drivers

bool reserve_forward(const Geometry& g, Workspace& ws) {
  return ws.x.reserve(g.ld * g.dp) && ws.xt.reserve(g.dp * g.ld) && ws.v.reserve(g.ld * g.dvp) &&
         ws.logits.reserve(g.square()) &&
         ws.tile.reserve((64 + 2) * (64 + 2 + 2 * kLanes)) && ws.keys.reserve(2 * 64 * 64) &&
         ws.small.reserve(136 + 64 * 64) && ws.out_row.reserve(64 * g.dvp) && ws.bitmap.reserve(64 * bitmap_words(g)) && ws.lists.reserve(32 * (g.ld + kLanes));
}

// X gathered, Xᵀ, and L (the shared first steps of every entry point).
void load_logits(const Geometry& g, const float* qk, const int64_t* stride, int64_t pair, int64_t heads,
                 float scale, Mirror mirror, Workspace& ws) {
  gather(qk, stride, pair, heads, g.n, g.d, g.ld, g.dp, ws.x.data);
  transpose(ws.x.data, g.dp, g.ld, g.dp, ws.xt.data, g.ld);
  compute_logits(g, ws.x.data, ws.xt.data, scale, mirror, ws.logits.data);
}


}  // namespace

Workspace* create_workspace() { return new (std::nothrow) Workspace(); }

void destroy_workspace(Workspace* ws) { delete ws; }

bool mask_pair(const ForwardParams& fp, const KeepCounts& keep, int64_t pair, Workspace* workspace) {
  Workspace& ws = *workspace;
  const Geometry g(fp.p);
  if (!reserve_forward(g, ws)) return false;
  load_logits(g, static_cast<const float*>(fp.qk), fp.qk_stride, pair, fp.p.heads, static_cast<float>(fp.p.scale),
              Mirror::kNone, ws);
  compute_mask_words(g, ws.logits.data, static_cast<const float*>(fp.score_kernel), keep, ws,
                     fp.saved.mask_words + pair * g.n * g.chunks);
  return true;
}

Outcome forward_pair(const ForwardParams& fp, const KeepCounts& keep, int64_t pair, Workspace* workspace) {
  Workspace& ws = *workspace;
  const Geometry g(fp.p);
  if (!reserve_forward(g, ws)) return Outcome::kNoMemory;
  uint64_t* words = fp.saved.mask_words + pair * g.n * g.chunks;
  int32_t* match = fp.saved.match + pair * g.n;
  float* rho = static_cast<float*>(fp.saved.rho) + pair * g.n;
  float* lse = static_cast<float*>(fp.saved.lse) + pair * g.n;
  float* log_row_sum = static_cast<float*>(fp.saved.log_row_sum) + pair * g.n;
  float* out = static_cast<float*>(fp.out) + pair * g.n * g.dv;

  load_logits(g, static_cast<const float*>(fp.qk), fp.qk_stride, pair, fp.p.heads, static_cast<float>(fp.p.scale),
              Mirror::kDiagonalBlocks, ws);
  // Value rows of a whole number of vectors with unit column stride are read where they
  // are, and output rows written in place: A·V reads only kept rows of V and writes whole
  // rows, so the gather and the copy back (a few % of the call) are not needed.
  const bool in_place = g.dv == g.dvp && fp.v_stride[3] == 1;
  const float* values = ws.v.data;
  int64_t ldv = g.dvp;
  if (in_place) {
    values = static_cast<const float*>(fp.v) + (pair / fp.p.heads) * fp.v_stride[0] +
             (pair % fp.p.heads) * fp.v_stride[1];
    ldv = fp.v_stride[2];
  } else {
    gather(static_cast<const float*>(fp.v), fp.v_stride, pair, fp.p.heads, g.n, g.dv, g.n, g.dvp, ws.v.data);
  }
  compute_mask_words(g, ws.logits.data, static_cast<const float*>(fp.score_kernel), keep, ws, words);
  compute_match(g, ws.x.data, ws.logits.data, static_cast<float>(fp.p.scale), ws, match, rho);

  // E = exp(L − c) with one shift for all rows (symmetric: half the exps), then one chunk
  // of rows at a time while it is in cache: softmax sums, weights with fusion, and A·V
  // over the kept entries only.
  float* exps = ws.logits.data;
  const float shift = logit_bound(g, exps);
  shifted_exps(g, shift, exps);
  for (int64_t m = 0; m < g.chunks; ++m) {
    const int64_t r0 = g.begin(m), rows = g.size(m);
    float alpha[64];
    if (!chunk_forward_rows(g, m, ws.x.data, static_cast<float>(fp.p.scale), shift, exps, words, match, rho,
                            fp.p.fuse, ws.bitmap.data, lse + r0, log_row_sum + r0, alpha))
      return Outcome::kNeedsPortable;
    if (sparse_rows_reads_pruned(g.dvp)) zero_pruned(g, m, ws.bitmap.data, exps);
    float* rows_out = in_place ? out + r0 * g.dv : ws.out_row.data;
    const int64_t ldo = in_place ? g.dv : g.dvp;
    sparse_rows(exps + r0 * g.ld, g.ld, ws.bitmap.data, bitmap_words(g), g.ld, values, ldv, g.dvp, alpha, rows,
                ws.lists.data, rows_out, ldo);
    if (!in_place) copy_rows(ws.out_row.data, g.dvp, rows, g.dv, out + r0 * g.dv, g.dv);
  }
  return Outcome::kDone;
}

Outcome backward_pair(const BackwardParams& bp, int64_t pair, Workspace* workspace) {
  Workspace& ws = *workspace;
  const Geometry g(bp.p);
  const int64_t N = g.n, ld = g.ld, C = g.chunks;
  if (!reserve_forward(g, ws) || !ws.vt.reserve(g.dvp * ld) || !ws.g.reserve(ld * g.dvp) ||
      !ws.dx.reserve(ld * g.dp) || !ws.bitmap.reserve(ld * bitmap_words(g)) ||
      !ws.lists.reserve((ld / 2 + 1) * (ld + kLanes)) || !ws.dv.reserve(ld * g.dvp) || !ws.weights.reserve(g.square()) || !ws.grad.reserve(g.square()) ||
      !ws.work.reserve(g.square()) || !ws.column.reserve(ld))
    return Outcome::kNoMemory;
  const uint64_t* words = bp.saved.mask_words + pair * N * C;
  const int32_t* match = bp.saved.match + pair * N;
  const float* rho = static_cast<const float*>(bp.saved.rho) + pair * N;
  const float* lse = static_cast<const float*>(bp.saved.lse) + pair * N;
  const float* log_row_sum = static_cast<const float*>(bp.saved.log_row_sum) + pair * N;
  for (int64_t i = 0; i < N; ++i)
    if (!(log_row_sum[i] >= kSmallestLogRowSum)) return Outcome::kNeedsPortable;
  float* grad_qk = static_cast<float*>(bp.grad_qk) + pair * N * g.d;
  float* grad_v = static_cast<float*>(bp.grad_v) + pair * N * g.dv;
  const float scale = static_cast<float>(bp.p.scale);
  const int64_t heads = bp.p.heads;

  float* probs = ws.logits.data;
  float* weights = ws.weights.data;  // R, then A = R / Z
  float* grad = ws.grad.data;        // G Vᵀ, then dR, dP, dL
  float* work = ws.work.data;        // Aᵀ, then S = scale · (dL + dLᵀ)

  load_logits(g, static_cast<const float*>(bp.qk), bp.qk_stride, pair, heads, scale, Mirror::kAll, ws);
  gather(static_cast<const float*>(bp.v), bp.v_stride, pair, heads, N, g.dv, ld, g.dvp, ws.v.data);
  gather(static_cast<const float*>(bp.grad_out), bp.grad_out_stride, pair, heads, N, g.dv, ld, g.dvp, ws.g.data);
  transpose(ws.v.data, g.dvp, ld, g.dvp, ws.vt.data, ld);

  for (int64_t i = 0; i < N; ++i) probs_row(g, probs + i * ld, lse[i]);
  std::memset(probs + N * ld, 0, sizeof(float) * (ld - N) * ld);

  // A = R / Z, with R rebuilt from P and the saved choices (the forward's own code).
  float recomputed_z[64];  // the saved Z is used instead, as in the portable path
  for (int64_t m = 0; m < C; ++m)
    chunk_weights(g, m, probs, words, match, rho, bp.p.fuse, ws.bitmap.data, weights + g.begin(m) * ld,
                  recomputed_z);
  std::memset(weights + N * ld, 0, sizeof(float) * (ld - N) * ld);
  float* inv_row_sum = ws.column.data;  // 1 / Z_i (the column is free until dρ below)
  for (int64_t i = 0; i < N; ++i) inv_row_sum[i] = __builtin_expf(-log_row_sum[i]);
  for (int64_t i = 0; i < N; ++i) {
    const __m256 inv = _mm256_set1_ps(inv_row_sum[i]);
    float* a = weights + i * ld;
    for (int64_t j = 0; j < ld; j += kLanes) _mm256_storeu_ps(a + j, _mm256_mul_ps(inv, _mm256_loadu_ps(a + j)));
  }

  // dA = G Vᵀ (dense: only kept entries are used), then
  // dR(i, j) = M(i, j) · (dA(i, j) − Σ_k A(i, k) dA(i, k)) / Z_i.
  gemm(ws.g.data, g.dvp, ws.vt.data, ld, g.dv, grad, ld, ld, ld, 1.0f, /*upper=*/false);
  uint64_t* bitmaps = ws.bitmap.data;
  for (int64_t i = 0; i < N; ++i) {
    const float* a = weights + i * ld;
    float* dr = grad + i * ld;
    __m256 s = _mm256_setzero_ps();
    for (int64_t j = 0; j < ld; j += kLanes)
      s = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(dr + j), s);
    const __m256 a_dot_da = _mm256_set1_ps(hsum(s)), inv = _mm256_set1_ps(inv_row_sum[i]);
    uint64_t* bitmap = bitmaps + i * bitmap_words(g);  // kept for dV below
    row_bitmap(g, words + i * C, bitmap);
    for (int64_t j = 0; j < ld; j += kLanes) {
      const __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(dr + j), a_dot_da), inv);
      _mm256_storeu_ps(dr + j, _mm256_and_ps(expand_bits(bitmap_byte(bitmap, j)), v));
    }
  }
  std::memset(grad + N * ld, 0, sizeof(float) * (ld - N) * ld);

  // dV_j = Σ_i A(i, j) G_i over kept (i, j); M is symmetric, so row j's kept columns are
  // exactly the i with (i, j) kept, and Aᵀ makes the coefficients contiguous.
  transpose(weights, ld, ld, ld, work, ld);
  sparse_rows(work, ld, ws.bitmap.data, bitmap_words(g), ld, ws.g.data, g.dvp, g.dvp, nullptr, N, ws.lists.data,
              ws.dv.data, g.dvp);
  copy_rows(ws.dv.data, g.dvp, N, g.dv, grad_v, g.dv);

  // dP = M ⊙ dR plus, on pruned (i, j), ρ_i · H · dR(b(i), j); and dρ_i (SPEC §4).
  // In place: the writes go to pruned entries, the reads to kept ones.
  float* grad_rho = ws.column.data;
  for (int64_t i = 0; i < N; ++i) {
    float acc = 0.0f;
    if (bp.p.fuse) {
      const float* grad_target = grad + match[i] * ld;
      const float* p = probs + i * ld;
      float* dp = grad + i * ld;
      const float r = rho[i];
      for_each_fused_entry(g, i, words, match, rho, [&](int64_t j, float similarity) {
        dp[j] += r * similarity * grad_target[j];
        acc += similarity * p[j] * grad_target[j];
      });
    }
    grad_rho[i] = acc;
  }

  // dL = P ⊙ (dP − Σ_k P(i, k) dP(i, k)).
  for (int64_t i = 0; i < N; ++i) {
    const float* p = probs + i * ld;
    float* dl = grad + i * ld;
    __m256 s = _mm256_setzero_ps();
    for (int64_t j = 0; j < ld; j += kLanes) s = _mm256_fmadd_ps(_mm256_loadu_ps(p + j), _mm256_loadu_ps(dl + j), s);
    const __m256 vs = _mm256_set1_ps(hsum(s));
    for (int64_t j = 0; j < ld; j += kLanes)
      _mm256_storeu_ps(dl + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(dl + j), vs)));
  }

  // dX = S X with S = scale · (dL + dLᵀ).
  transpose(grad, ld, ld, ld, work, ld);
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t e = 0; e < ld * ld; e += kLanes)
    _mm256_storeu_ps(work + e, _mm256_mul_ps(vscale, _mm256_add_ps(_mm256_loadu_ps(work + e), _mm256_loadu_ps(grad + e))));
  float* dx = ws.dx.data;
  gemm(work, ld, ws.x.data, g.dp, N, dx, g.dp, ld, g.dp, 1.0f, /*upper=*/false);

  // The cosine behind ρ_i = max(cos(x_i, x_b(i)), 0) (SPEC §4, last line).
  const float* x = ws.x.data;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t q = match[i];
    if (q == i || !(rho[i] > 0.0f) || grad_rho[i] == 0.0f) continue;
    const float* xi = x + i * g.dp;
    const float* xq = x + q * g.dp;
    const float nx = __builtin_sqrtf(dot(xi, xi, g.dp)), nq = __builtin_sqrtf(dot(xq, xq, g.dp));
    const float prod = nx * nq, gr = grad_rho[i];
    float* gi = dx + i * g.dp;
    float* gq = dx + q * g.dp;
    if (prod >= kCosEps) {
      const float cos = dot(xi, xq, g.dp) / prod;
      const __m256 a = _mm256_set1_ps(gr / prod), bi = _mm256_set1_ps(gr * cos / (nx * nx)),
                   bq = _mm256_set1_ps(gr * cos / (nq * nq));
      for (int64_t k = 0; k < g.dp; k += kLanes) {
        const __m256 vi = _mm256_loadu_ps(xi + k), vq = _mm256_loadu_ps(xq + k);
        _mm256_storeu_ps(gi + k, _mm256_fnmadd_ps(bi, vi, _mm256_fmadd_ps(a, vq, _mm256_loadu_ps(gi + k))));
        _mm256_storeu_ps(gq + k, _mm256_fnmadd_ps(bq, vq, _mm256_fmadd_ps(a, vi, _mm256_loadu_ps(gq + k))));
      }
    } else {
      const __m256 a = _mm256_set1_ps(gr / kCosEps);
      for (int64_t k = 0; k < g.dp; k += kLanes) {
        _mm256_storeu_ps(gi + k, _mm256_fmadd_ps(a, _mm256_loadu_ps(xq + k), _mm256_loadu_ps(gi + k)));
        _mm256_storeu_ps(gq + k, _mm256_fmadd_ps(a, _mm256_loadu_ps(xi + k), _mm256_loadu_ps(gq + k)));
      }
    }
  }
  copy_rows(dx, g.dp, N, g.d, grad_qk, g.d);
  return Outcome::kDone;
}

}  // namespace bspf::cpu::avx2
