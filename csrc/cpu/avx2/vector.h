// Vector helpers of the AVX2+FMA path: horizontal reductions, lane masks, padded copies,
// exp, log, dot products, 8×8 transposes. Included by the path's files only: the portable path
// never sees a function compiled with AVX2 (see csrc/cpu/kernels.h).
//
// They have internal linkage (an unnamed namespace): each AVX2 file keeps its own copy, so
// the linker can never merge one with another file's, and GCC inlines them as it did when
// the path was one file (with external linkage it kept transpose8 out of line, measured
// 2% more instructions in the forward).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace bspf::cpu::avx2 {

constexpr int64_t kLanes = 8;

// For each byte, lane l all ones where its bit l is set (8 KB, defined in
// softmax_fusion.cpp): the row loops turn mask bits into lane masks with one load instead
// of a broadcast, an and and a compare (those three were the hottest instructions of the
// forward's row sums under perf).
struct ByteLaneMasks {
  alignas(32) int32_t lanes[256][8];
};
extern const ByteLaneMasks kByteLaneMasks;

namespace {

inline int64_t round_up8(int64_t n) { return (n + 7) & ~int64_t{7}; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline uint64_t low_bits(int64_t n) { return n >= 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1; }

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

// Lane l all ones where bit l of `byte` (0..255) is set: one load from kByteLaneMasks.
inline __m256 expand_bits(uint32_t byte) {
  return _mm256_load_ps(reinterpret_cast<const float*>(kByteLaneMasks.lanes[byte]));
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

// ln x to within 1 ulp (measured over every 97th float32) for positive, normal, finite x
// (Cephes' logf: x = m · 2^e with m in [√½, √2), ln m by a degree-8 polynomial in m − 1);
// other inputs give meaningless values.
inline __m256 log256(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i mantissa = _mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(mantissa, _mm256_set1_epi32(0x3F800000)));  // [1, 2)
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127)));
  const __m256 above = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), above);
  e = _mm256_add_ps(e, _mm256_and_ps(above, _mm256_set1_ps(1.0f)));
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.0f)), z = _mm256_mul_ps(f, f);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);  // ln 2 in two parts, as exp256
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
}

// Σ a[k] · b[k] over padded_len entries (a multiple of 8) in four chains of FMAs: one chain
// waits on the FMA latency every 8 entries, which bound the backward's sums over rows of N.
inline float dot(const float* a, const float* b, int64_t padded_len) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  auto term = [&](int64_t k, __m256 acc) {
    return _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
  };
  int64_t k = 0;
  for (; k + 32 <= padded_len; k += 32) {
    acc0 = term(k, acc0);
    acc1 = term(k + 8, acc1);
    acc2 = term(k + 16, acc2);
    acc3 = term(k + 24, acc3);
  }
  if (k < padded_len) acc0 = term(k, acc0);
  if (k + 8 < padded_len) acc1 = term(k + 8, acc1);
  if (k + 16 < padded_len) acc2 = term(k + 16, acc2);
  return hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}

// An 8×8 tile in registers, row i in r[i], transposed in place.
inline void transpose8_in_registers(__m256 (&r)[8]) {
  __m256 t[8];
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
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}

// dst (8×8, row stride ldd) = transpose of src (8×8, row stride lds).
inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  transpose8_in_registers(r);
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * ldd, r[i]);
}

// dst (cols×rows) = srcᵀ for src (rows×cols); rows and cols multiples of 8.
inline void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  for (int64_t i = 0; i < rows; i += 8)
    for (int64_t j = 0; j < cols; j += 8) transpose8(src + i * lds + j, lds, dst + j * ldd + i, ldd);
}

}  // namespace
}  // namespace bspf::cpu::avx2
