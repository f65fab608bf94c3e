// The AVX2 path's keep mask (selection.h).
#include "selection.h"

#include <immintrin.h>

#include <climits>
#include <cstring>

namespace bspf::cpu::avx2 {
namespace {

// Float → int32 whose signed order is the float order; -0 counts as +0 and NaN as -inf
// (NaN ranks last, as in the portable path).
inline __m256i order_key(__m256 s) {
  s = _mm256_add_ps(s, _mm256_setzero_ps());  // -0 + 0 = +0
  s = _mm256_blendv_ps(_mm256_set1_ps(-__builtin_inff()), s, _mm256_cmp_ps(s, s, _CMP_ORD_Q));
  const __m256i bits = _mm256_castps_si256(s);
  const __m256i flip = _mm256_and_si256(_mm256_srai_epi32(bits, 31), _mm256_set1_epi32(0x7FFFFFFF));
  return _mm256_xor_si256(bits, flip);
}

// How many of `count` keys are ≥ threshold; count is a multiple of 64 (a block's keys are
// round_up8(rows) × round_up8(cols)). A search is a chain of these passes, so they are kept
// short: per 8 keys one compare (with its load) and one add of its mask (-1 for each key
// below the threshold). The masks of 64 keys are summed in a tree into one accumulator:
// GCC copies a loop's vector accumulators once per iteration, one copy per 64 keys.
inline int64_t count_at_least(const int32_t* keys, int64_t count, int32_t threshold) {
  const __m256i t = _mm256_set1_epi32(threshold);
  auto below8 = [&](int64_t e) {
    return _mm256_cmpgt_epi32(t, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + e)));
  };
  auto below16 = [&](int64_t e) { return _mm256_add_epi32(below8(e), below8(e + 8)); };
  auto below32 = [&](int64_t e) { return _mm256_add_epi32(below16(e), below16(e + 16)); };
  __m256i minus = _mm256_setzero_si256();
  for (int64_t e = 0; e < count; e += 64)
    minus = _mm256_add_epi32(minus, _mm256_add_epi32(below32(e), below32(e + 32)));
  return count + hsum_epi32(minus);
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

// A block's kept entries in the two layouts its mask words come from: by row (bit j of
// row[i]: entry (i, j)), and by 8-column group (byte[g][i]: bits 8g..8g+7 of row i), the
// layout transpose_bits() reads to make the mirrored block's rows.
struct KeptBits {
  uint64_t row[64];
  alignas(32) uint8_t byte[8][64];
};

// The kept entries of a searched block (§3.3): the keys above the k-th largest, and among
// keys equal to it the first ones in row-major order.
void kept_bits(const int32_t* keys, int64_t count, int64_t rows, int64_t cols, int64_t k, int32_t threshold,
               int64_t at_least, KeptBits& kept) {
  const int64_t groups = round_up8(cols) / kLanes, sp = groups * kLanes;  // sp: key row stride
  auto mask_of = [](__m256i lanes) { return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(lanes))); };
  if (at_least == k) {
    // Exactly the keys ≥ threshold (> INT_MIN, so padding never counts). Each compare's
    // mask is one byte of both layouts; the last group first, so a row word takes it with
    // a constant shift.
    const __m256i below = _mm256_set1_epi32(threshold - 1);
    for (int64_t i = 0; i < rows; ++i) {
      uint64_t bits = 0;
      for (int64_t g = groups - 1; g >= 0; --g) {
        const __m256i key = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i * sp + g * kLanes));
        const uint32_t byte = mask_of(_mm256_cmpgt_epi32(key, below));
        kept.byte[g][i] = static_cast<uint8_t>(byte);
        bits = bits << 8 | byte;
      }
      kept.row[i] = bits;
    }
    return;
  }
  // Ties at the k-th key: keys above it, then equal ones in row-major order.
  // #(key > threshold) = #(key ≥ threshold + 1); threshold < INT_MAX since it is a real key.
  const __m256i t = _mm256_set1_epi32(threshold);
  int64_t need = k - count_at_least(keys, count, threshold + 1);
  for (int64_t i = 0; i < rows; ++i) {
    uint64_t greater = 0, equal = 0;
    for (int64_t g = groups - 1; g >= 0; --g) {
      const __m256i key = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i * sp + g * kLanes));
      greater = greater << 8 | mask_of(_mm256_cmpgt_epi32(key, t));
      equal = equal << 8 | mask_of(_mm256_cmpeq_epi32(key, t));
    }
    for (; need > 0 && equal; --need) {
      greater |= equal & (~equal + 1);  // lowest set bit
      equal &= equal - 1;
    }
    kept.row[i] = greater;
    for (int64_t g = 0; g < groups; ++g, greater >>= 8) kept.byte[g][i] = static_cast<uint8_t>(greater);
  }
}

// The mirrored block's rows: bit i of col_bits[j] is entry (i, j), for j < round_up8(cols).
// By 8-column group: one movemask takes the top bit of 32 rows' bytes at once (the group's
// last column), and shifting every byte left by one brings the next column to the top.
void transpose_bits(const KeptBits& kept, int64_t rows, int64_t cols, uint64_t* col_bits) {
  const uint64_t real_rows = low_bits(rows);  // bytes past the block's rows are stale
  for (int64_t g = 0; g * kLanes < cols; ++g) {
    uint64_t column[8] = {};
    for (int64_t i0 = 0; i0 < rows; i0 += 32) {
      __m256i top = _mm256_load_si256(reinterpret_cast<const __m256i*>(&kept.byte[g][i0]));
      for (int c = 7; c >= 0; --c) {
        column[c] |= static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_epi8(top))) << i0;
        top = _mm256_slli_epi64(top, 1);
      }
    }
    for (int c = 0; c < 8; ++c) col_bits[g * kLanes + c] = column[c] & real_rows;
  }
}

// Keeps the k best entries of one upper block (§3.3), scored by products.score_block, and
// returns the kept bits (kept.row per row) and the mirrored block's rows in `col_bits`.
//
// Selection is a bisection on the order keys for the k-th largest, without sorting: the
// kept set is every key above it plus, among keys equal to it, the first ones in
// row-major order. It stops early once some threshold splits off exactly k entries.
void select_block(const Geometry& g, const Products& products, const float* logits, int64_t r0, int64_t rows,
                  int64_t c0, int64_t cols, const float* score_kernel, const BlockRank& rank, Workspace& ws,
                  KeptBits& kept, uint64_t* col_bits) {
  const int64_t k = rank.k;
  const int64_t sp = round_up8(cols), rp = round_up8(rows);  // key row stride, rows with padding
  int32_t* keys = ws.keys.data;
  const BlockScores scores =
      products.score_block(logits + r0 * g.ld + c0, g.ld, rows, cols, score_kernel, ws.tile.data, keys);
  const double mean = scores.mean, deviation = scores.deviation;

  const int64_t count = rp * sp;
  int32_t threshold = 0;
  int64_t at_least = 0;
  if (!search_by_value(keys, count, rows * cols, rank, mean, deviation, scores.lowest_key, scores.highest_key,
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
  kept_bits(keys, count, rows, cols, k, threshold, at_least, kept);
  transpose_bits(kept, rows, cols, col_bits);
}

}  // namespace

BlockScores score_block(const float* block, int64_t ld, int64_t rows, int64_t cols, const float* score_kernel,
                        float* tile, int32_t* keys) {
  const int64_t ts = round_up8(cols + 2) + kLanes;  // padded tile row: zero, cols values, zeros
  const int64_t sp = round_up8(cols);               // key row stride
  const __m256 zero = _mm256_setzero_ps();

  std::memset(tile, 0, sizeof(float) * ts);
  std::memset(tile + (rows + 1) * ts, 0, sizeof(float) * ts);
  for (int64_t i = 0; i < rows; ++i) {
    float* t = tile + (i + 1) * ts;
    const float* src = block + i * ld;
    t[0] = 0.0f;
    for (int64_t j = 0; j < cols; j += kLanes) _mm256_storeu_ps(t + 1 + j, _mm256_loadu_ps(src + j));
    _mm256_storeu_ps(t + 1 + cols, zero);  // what the last vector copied past the block
  }

  __m256 w[9];
  for (int e = 0; e < 9; ++e) w[e] = _mm256_set1_ps(score_kernel[e]);
  const __m256i padding = _mm256_set1_epi32(INT_MIN);  // below every real key
  __m256i lowest = _mm256_set1_epi32(INT_MAX), highest = padding;
  __m256 sum = zero, sum_squares = zero;  // of the scores: the search's first guess
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < sp; j += kLanes) {
      __m256 s = _mm256_mul_ps(w[0], _mm256_loadu_ps(tile + i * ts + j));
      for (int e = 1; e < 9; ++e)
        s = _mm256_fmadd_ps(w[e], _mm256_loadu_ps(tile + (i + e / 3) * ts + j + e % 3), s);
      __m256i key = order_key(s);
      if (j + kLanes > cols) {
        const __m256 real = lane_mask(cols - j);
        const __m256i real_i = _mm256_castps_si256(real);
        key = _mm256_blendv_epi8(padding, key, real_i);
        lowest = _mm256_min_epi32(lowest, _mm256_blendv_epi8(_mm256_set1_epi32(INT_MAX), key, real_i));
        s = _mm256_and_ps(s, real);
      } else {
        lowest = _mm256_min_epi32(lowest, key);
      }
      highest = _mm256_max_epi32(highest, key);
      sum = _mm256_add_ps(sum, s);
      sum_squares = _mm256_fmadd_ps(s, s, sum_squares);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + i * sp + j), key);
    }
  const int64_t rp = round_up8(rows);
  for (int64_t i = rows; i < rp; ++i)
    for (int64_t j = 0; j < sp; j += kLanes)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + i * sp + j), padding);

  BlockScores scores;
  const double entries = static_cast<double>(rows * cols);
  scores.mean = hsum(sum) / entries;
  const double variance = hsum(sum_squares) / entries - scores.mean * scores.mean;
  scores.deviation = variance > 0.0 ? __builtin_sqrt(variance) : 0.0;  // 0 (no model) for NaN too
  scores.lowest_key = hmin_epi32(lowest);
  scores.highest_key = hmax_epi32(highest);
  return scores;
}

void compute_mask_words(const Geometry& g, const Products& products, const float* logits, const float* score_kernel,
                        const KeepCounts& keep, Workspace& ws, uint64_t* words) {
  const int64_t C = g.chunks;
  std::memset(words, 0, sizeof(uint64_t) * g.n * C);
  for (int64_t m = 0; m < C; ++m)
    for (int64_t i = g.begin(m); i < g.begin(m) + g.size(m); ++i) words[i * C + m] = low_bits(g.size(m));
  KeptBits kept;
  uint64_t col_bits[64];
  // Upper blocks have full rows; their columns are full or the last chunk.
  const BlockRank full = block_rank(keep.full, g.omega * g.omega), tail = block_rank(keep.tail, g.omega * g.last);
  for (int64_t m = 0; m + 1 < C; ++m) {
    const int64_t r0 = g.begin(m), rows = g.size(m);
    for (int64_t bn = m + 1; bn < C; ++bn) {
      const int64_t c0 = g.begin(bn), cols = g.size(bn);
      const BlockRank& rank = bn == C - 1 ? tail : full;
      if (rank.k <= 0) continue;
      if (rank.k >= rows * cols) {
        for (int64_t i = 0; i < rows; ++i) kept.row[i] = low_bits(cols);
        for (int64_t j = 0; j < cols; ++j) col_bits[j] = low_bits(rows);
      } else {
        select_block(g, products, logits, r0, rows, c0, cols, score_kernel, rank, ws, kept, col_bits);
      }
      for (int64_t i = 0; i < rows; ++i) words[(r0 + i) * C + bn] = kept.row[i];
      for (int64_t j = 0; j < cols; ++j) words[(c0 + j) * C + m] = col_bits[j];
    }
  }
}

}  // namespace bspf::cpu::avx2
