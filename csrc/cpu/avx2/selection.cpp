// The AVX2 path's keep mask (selection.h), also the AVX-512 path's (which only scores
// blocks 16 lanes wide). Per upper block: scores as order keys, a search for the k-th
// largest key by counting keys at or above probe thresholds, and the kept bits by row and,
// transposed, by column for the mirrored block. The searches of a row chunk's blocks run
// side by side (run_searches).
#include "selection.h"

#include <immintrin.h>

#include <climits>
#include <cstring>

namespace bspf::cpu::avx2 {
namespace {

// Float → int32 whose signed order is the float order; -0 counts as +0 and NaN as -inf
// (NaN ranks last, as in the portable path). nan_last false: for scores whose block is
// scored again when one is not finite (the uniform kernel's, see score_block), NaN's key is
// left as it falls.
inline __m256i order_key(__m256 s, bool nan_last) {
  s = _mm256_add_ps(s, _mm256_setzero_ps());  // -0 + 0 = +0
  if (nan_last) s = _mm256_blendv_ps(_mm256_set1_ps(-__builtin_inff()), s, _mm256_cmp_ps(s, s, _CMP_ORD_Q));
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

// The keep rule's k of a block and where its k-th score is expected (see Search).
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

// The threshold search of one block: the k-th largest of its `real` keys (the others,
// INT_MIN, are padding), found by counting keys at or above probe thresholds, without
// sorting.
//
// First by value, between the smallest and largest key. Scores are smooth and roughly bell
// shaped, so the first probe is where a normal distribution of their mean and standard
// deviation puts the k-th largest, the second a Newton step on that model's count from
// that probe; after that, interpolation on the counts within the bracket found so far,
// with a bisection whenever an interpolation step fails to halve the bracket. The
// maximum's own count is taken only if the bracket closes on it (ties at the top reaching
// k). Five passes over the keys on average land between the k-th and the (k+1)-th at the
// target shape (eight from the bracket [min, max] alone). When a score is not finite, or
// after kValueProbes probes, a bisection on the key bits takes over, which bounds the bad
// cases: in unsigned key space (u = key ^ 2^31), the largest u with ≥ k keys at or above
// it.
//
// Either stops as soon as a threshold splits off exactly k keys. When done, `threshold` is
// either a key with exactly k keys at or above it (at_least = k), or the k-th largest key
// itself (ties at it; at_least > k).
//
// The search is a state machine that moves one count at a time: `probe` is the key the
// next pass counts from, and advance() takes that count. So the searches of several blocks
// can run side by side (run_searches) and each still takes the steps it takes alone.
struct Search {
  enum Phase { kTop, kValue, kBits, kDone };
  Phase phase;
  int32_t probe;
  const int32_t* keys;
  int64_t count, real, k;  // keys with the padding, without, and how many to keep
  // By value: the bracket [lo, hi] = [end[0], end[1]] with count(≥ lo) = c_lo ≥ k and
  // count(≥ hi) = c_hi, < k unless lo = hi, in end_count[0] and [1]; while hi is still the
  // uncounted maximum (!top_counted), c_hi is 0 and stands only as the interpolation's
  // estimate, and closing on hi counts it (kTop). Arrays, so that a count picks the end it
  // replaces by an index: which end is a coin toss, and a branch on it (mispredicted half
  // the time) made the mask stage ~10% slower.
  // `candidate` is the value of probe; `model` says whether the normal model (mean,
  // deviation, and the rank's z and density) makes the first two probes.
  double end[2], last_width;
  int64_t end_count[2];
  int step;
  int last_side;  // the end the last probe replaced
  bool top_counted;  // hi has been replaced by a counted probe (else it is the maximum, uncounted)
  float candidate;
  bool model;
  double mean, deviation, z, density;
  // By key bits: the largest u so far with ≥ k keys at or above it, and the bit tried now.
  uint32_t u;
  int bit;
  // The result.
  int32_t threshold;
  int64_t at_least;
};

constexpr int kValueProbes = 24;

// x ≤ y ? a : b as a blend (GCC makes a branch of ?: on doubles).
inline double select_le(double x, double y, double a, double b) {
  const __m128d le = _mm_cmp_sd(_mm_set_sd(x), _mm_set_sd(y), _CMP_LE_OQ);
  return _mm_cvtsd_f64(_mm_blendv_pd(_mm_set_sd(b), _mm_set_sd(a), le));
}

void finish(Search& s, int32_t threshold, int64_t at_least) {
  s.phase = Search::kDone;
  s.threshold = threshold;
  s.at_least = at_least;
}

// The bisection on key bits, from u = 0 (all count keys, which are more than k).
void start_bits(Search& s) {
  s.phase = Search::kBits;
  s.u = 0;
  s.at_least = s.count;
  s.bit = 31;
  s.probe = static_cast<int32_t>((uint32_t{1} << 31) ^ 0x80000000u);
}

// Sets the next probe of the search by value, or finishes it where lo and hi are adjacent
// floats (then lo is the k-th largest score). Inlined into advance(): as a call it was ~3%
// of the mask stage (a C++ harness over 48 pairs' logits).
__attribute__((always_inline)) inline void next_value_probe(Search& s) {
  if (s.step == kValueProbes) return start_bits(s);
  const int64_t k = s.k;
  const double lo = s.end[0], hi = s.end[1];
  const int64_t c_lo = s.end_count[0], c_hi = s.end_count[1];
  double t;
  if (s.step == 0 && s.model) {
    t = s.mean + s.z * s.deviation;
  } else if (s.step == 1 && s.model) {
    // Newton on the model's count, from whichever end of the bracket the first probe set.
    const int moved = s.last_side;
    const double probe = s.end[moved], c = static_cast<double>(s.end_count[moved]);
    t = probe + (c - static_cast<double>(k)) * s.deviation / (static_cast<double>(s.real) * s.density);
  } else {
    // Interpolation on the counts, or a bisection where the last step failed to halve the
    // bracket (a blend, not a branch: the choice is as unpredictable as the bracket's side).
    const double interpolated = (static_cast<double>(c_lo - k) - 0.5) / static_cast<double>(c_lo - c_hi);
    t = lo + (hi - lo) * select_le(hi - lo, 0.5 * s.last_width, interpolated, 0.5);
  }
  s.last_width = hi - lo;
  float candidate = static_cast<float>(t);
  if (!(candidate > static_cast<float>(lo) && candidate < static_cast<float>(hi))) {
    candidate = static_cast<float>(lo + (hi - lo) * 0.5);
    if (!(candidate > static_cast<float>(lo) && candidate < static_cast<float>(hi))) {
      if (s.top_counted) return finish(s, key_of(static_cast<float>(lo)), c_lo);
      s.phase = Search::kTop;  // lo is the k-th largest unless ties at the maximum reach k
      s.probe = key_of(static_cast<float>(hi));
      return;
    }
  }
  s.candidate = candidate;
  s.probe = key_of(candidate);
}

// A search over `count` keys of which `real` are the block's, from what scoring found.
void start_search(Search& s, const int32_t* keys, int64_t count, int64_t real, const BlockRank& rank,
                  const BlockScores& scores) {
  s.keys = keys;
  s.count = count;
  s.real = real;
  s.k = rank.k;
  s.step = 0;
  const float lowest = value_of(scores.lowest_key), highest = value_of(scores.highest_key);
  const float inf = __builtin_inff();
  // Not finite (NaN too, which ranks as -inf), or nothing to leave out: by key bits.
  if (!(lowest > -inf && highest < inf) || real <= s.k) return start_bits(s);
  s.end[0] = lowest;
  s.end[1] = highest;
  s.end_count[0] = real;
  s.last_width = s.end[1] - s.end[0];
  s.mean = scores.mean;
  s.deviation = scores.deviation;
  s.z = rank.z;
  s.density = rank.density;
  s.model = s.deviation > 0.0 && s.density > 0.0 && s.deviation < 1e30;
  // The maximum's count is not taken first: it is below k unless ties at the top reach k,
  // which only a bracket closing on it can tell (next_value_probe counts it then).
  s.end_count[1] = 0;
  s.top_counted = false;
  s.last_side = 0;
  s.phase = Search::kValue;
  next_value_probe(s);
}

// Moves the search on by the count of keys at or above its probe.
void advance(Search& s, int64_t c) {
  switch (s.phase) {
    case Search::kTop:  // the maximum, counted once the bracket closed on it
      if (c >= s.k) return finish(s, s.probe, c);
      return finish(s, key_of(static_cast<float>(s.end[0])), s.end_count[0]);
    case Search::kValue: {
      if (c == s.k) return finish(s, s.probe, c);
      const int side = c > s.k ? 0 : 1;  // the probe becomes lo or hi
      s.end[side] = s.candidate;
      s.end_count[side] = c;
      s.last_side = side;
      s.top_counted |= side == 1;
      ++s.step;
      return next_value_probe(s);
    }
    case Search::kBits:
      if (c >= s.k) {
        s.u = static_cast<uint32_t>(s.probe) ^ 0x80000000u;
        s.at_least = c;
      }
      if (--s.bit < 0 || s.at_least == s.k) return finish(s, static_cast<int32_t>(s.u ^ 0x80000000u), s.at_least);
      s.probe = static_cast<int32_t>((s.u | uint32_t{1} << s.bit) ^ 0x80000000u);
      return;
    case Search::kDone:
      return;
  }
}

// The most blocks whose searches run side by side.
constexpr int kMaxGroup = 16;

// Runs n ≤ kMaxGroup searches to the end side by side: each round counts once for every
// search still running, then moves each on. One search alone is latency bound (a count,
// then the arithmetic that picks the next probe from it, then the next count); the counts
// of a round are independent of each other, and so is each search's arithmetic, so
// out-of-order execution overlaps them.
void run_searches(Search* searches, int n) {
  int running[kMaxGroup];
  int live = 0;
  for (int b = 0; b < n; ++b)
    if (searches[b].phase != Search::kDone) running[live++] = b;
  while (live > 0) {
    int64_t counts[kMaxGroup];
    for (int r = 0; r < live; ++r) {
      const Search& s = searches[running[r]];
      counts[r] = count_at_least(s.keys, s.count, s.probe);
    }
    int still = 0;
    for (int r = 0; r < live; ++r) {
      Search& s = searches[running[r]];
      advance(s, counts[r]);
      if (s.phase != Search::kDone) running[still++] = running[r];
    }
    live = still;
  }
}

// A block's kept entries in the two layouts its mask words come from: by row (bit j of
// row[i]: entry (i, j)), and by 8-column group (byte[g][i]: bits 8g..8g+7 of row i), the
// layout transpose_bits() reads to make the mirrored block's rows.
struct KeptBits {
  uint64_t row[64];
  alignas(32) uint8_t byte[8][64];
};

// The kept entries of a searched block whose k-th largest key `threshold` is tied (more
// than k keys ≥ it, §3.3): the keys above it, then among keys equal to it the first ones
// in row-major order.
void kept_bits_with_ties(const Search& s, int64_t rows, int64_t cols, KeptBits& kept) {
  const int64_t groups = round_up8(cols) / kLanes, sp = groups * kLanes;  // sp: key row stride
  const int32_t* keys = s.keys;
  auto mask_of = [](__m256i lanes) { return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(lanes))); };
  // #(key > threshold) = #(key ≥ threshold + 1); threshold < INT_MAX since it is a real key.
  const __m256i t = _mm256_set1_epi32(s.threshold);
  int64_t need = s.k - count_at_least(keys, s.count, s.threshold + 1);
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

// Exactly the keys ≥ threshold (> INT_MIN, so padding never counts). Each compare's mask
// is one byte of both layouts; the last group first, so a row word takes it with a
// constant shift.
void kept_bits(const int32_t* keys, int64_t rows, int64_t cols, int32_t threshold, KeptBits& kept) {
  const int64_t groups = round_up8(cols) / kLanes, sp = groups * kLanes;  // sp: key row stride
  const __m256i below = _mm256_set1_epi32(threshold - 1);
  for (int64_t i = 0; i < rows; ++i) {
    uint64_t bits = 0;
    for (int64_t g = groups - 1; g >= 0; --g) {
      const __m256i key = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i * sp + g * kLanes));
      const uint32_t byte = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, below))));
      kept.byte[g][i] = static_cast<uint8_t>(byte);
      bits = bits << 8 | byte;
    }
    kept.row[i] = bits;
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

// A block's row words to upper[i · stride], and its columns', the mirrored block's rows, to
// lower[j · stride].
void write_words(const uint64_t* row_bits, int64_t rows, const uint64_t* col_bits, int64_t cols, uint64_t* upper,
                 uint64_t* lower, int64_t stride) {
  for (int64_t i = 0; i < rows; ++i) upper[i * stride] = row_bits[i];
  for (int64_t j = 0; j < cols; ++j) lower[j * stride] = col_bits[j];
}

// Upper block (m, n)'s rows into the pair's mask words, and the mirrored block's (n, m).
void write_block(const Geometry& g, int64_t m, int64_t n, const uint64_t* row_bits, const uint64_t* col_bits,
                 uint64_t* words) {
  const int64_t C = g.chunks;
  write_words(row_bits, g.size(m), col_bits, g.size(n), words + g.begin(m) * C + n, words + g.begin(n) * C + m, C);
}

// An upper block that keeps everything (k ≥ its entries), and its mirror.
void write_full_block(const Geometry& g, int64_t m, int64_t n, uint64_t* words) {
  uint64_t row_bits[64], col_bits[64];
  for (int64_t i = 0; i < g.size(m); ++i) row_bits[i] = low_bits(g.size(n));
  for (int64_t j = 0; j < g.size(n); ++j) col_bits[j] = low_bits(g.size(m));
  write_block(g, m, n, row_bits, col_bits, words);
}

// Selects the upper blocks (m, first), (m, first + 1), … that one group holds (at most
// kMaxGroup searches, their keys within kSelectionKeys), writes their bits, and returns
// the first block column left for the next group. The group's blocks are all scored
// first, then searched side by side.
int64_t select_group(const Geometry& g, const Products& products, const float* logits, const float* score_kernel,
                     const BlockRank& full, const BlockRank& tail, int64_t m, int64_t first, Workspace& ws,
                     uint64_t* words) {
  const int64_t C = g.chunks, r0 = g.begin(m), rows = g.size(m);
  Search searches[kMaxGroup];
  int64_t block_column[kMaxGroup];
  int n = 0;
  int64_t used = 0;  // keys of ws.keys taken
  int64_t bn = first;
  for (; bn < C && n < kMaxGroup; ++bn) {
    const int64_t c0 = g.begin(bn), cols = g.size(bn);
    const BlockRank& rank = bn == C - 1 ? tail : full;
    if (rank.k <= 0) continue;
    if (rank.k >= rows * cols) {
      write_full_block(g, m, bn, words);
      continue;
    }
    const int64_t count = round_up8(rows) * round_up8(cols);
    if (used + count > kSelectionKeys) break;
    int32_t* keys = ws.keys.data + used;
    const BlockScores scores =
        products.score_block(logits + r0 * g.ld + c0, g.ld, rows, cols, score_kernel, ws.tile.data, keys);
    start_search(searches[n], keys, count, rows * cols, rank, scores);
    block_column[n++] = bn;
    used += count;
  }
  run_searches(searches, n);
  KeptBits kept;
  uint64_t col_bits[64];
  for (int b = 0; b < n; ++b) {
    const Search& s = searches[b];
    const int64_t column = block_column[b], cols = g.size(column);
    if (s.at_least == s.k) {  // the usual case: the kept entries are exactly the keys ≥ threshold
      products.kept_words(s.keys, rows, cols, s.threshold, words + r0 * C + column, words + g.begin(column) * C + m, C);
      continue;
    }
    kept_bits_with_ties(s, rows, cols, kept);
    transpose_bits(kept, rows, cols, col_bits);
    write_block(g, m, column, kept.row, col_bits, words);
  }
  return bn;
}

}  // namespace

void kept_words(const int32_t* keys, int64_t rows, int64_t cols, int32_t threshold, uint64_t* upper, uint64_t* lower,
                int64_t stride) {
  KeptBits kept;
  uint64_t col_bits[64];
  kept_bits(keys, rows, cols, threshold, kept);
  transpose_bits(kept, rows, cols, col_bits);
  write_words(kept.row, rows, col_bits, cols, upper, lower, stride);
}

namespace {

// score_block with the kernel term by term, or (`uniform`, all nine weights equal) as
// w · ((h_above + h_here) + h_below), h a tile row's three neighbours summed, (left +
// centre) + right, in place in the tile before the scores: 5 operations per score
// instead of 9 (the AVX-512 scoring does the same operations).
BlockScores score_block_as(bool uniform, const float* block, int64_t ld, int64_t rows, int64_t cols,
                           const float* score_kernel, float* tile, int32_t* keys) {
  const int64_t ts = round_up8(cols + 2) + kLanes;  // padded tile row: zero, cols values, zeros
  const int64_t sp = round_up8(cols);               // key row stride
  const __m256 zero = _mm256_setzero_ps();

  std::memset(tile, 0, sizeof(float) * ts);
  std::memset(tile + (rows + 1) * ts, 0, sizeof(float) * ts);
  for (int64_t i = 0; i < rows; ++i) {
    float* t = tile + (i + 1) * ts;
    const float* src = block + i * ld;
    t[0] = 0.0f;
    // Nothing past the block is read: there another worker of a team may be mirroring
    // tiles (the last block column's rows end in the next row's first columns).
    copy_padded(src, cols, t + 1);
    _mm256_storeu_ps(t + 1 + cols, zero);  // the row's right padding, whatever the tile held
  }

  if (uniform)
    for (int64_t r = 0; r < rows + 2; ++r)  // left to right: a vector's stores are behind its next reads
      for (int64_t j = 0; j < sp; j += kLanes) {
        float* t = tile + r * ts + j;
        _mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(t), _mm256_loadu_ps(t + 1)),
                                          _mm256_loadu_ps(t + 2)));
      }
  __m256 w[9];
  for (int e = 0; e < 9; ++e) w[e] = _mm256_set1_ps(score_kernel[e]);
  const __m256i padding = _mm256_set1_epi32(INT_MIN);  // below every real key
  __m256i lowest = _mm256_set1_epi32(INT_MAX), highest = padding;
  __m256 sum = zero, sum_squares = zero;  // of the scores: the search's first guess
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < sp; j += kLanes) {
      __m256 s;
      if (uniform) {
        const float* h = tile + i * ts + j;
        s = _mm256_mul_ps(w[0], _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(h), _mm256_loadu_ps(h + ts)),
                                              _mm256_loadu_ps(h + 2 * ts)));
      } else {
        s = _mm256_mul_ps(w[0], _mm256_loadu_ps(tile + i * ts + j));
        for (int e = 1; e < 9; ++e)
          s = _mm256_fmadd_ps(w[e], _mm256_loadu_ps(tile + (i + e / 3) * ts + j + e % 3), s);
      }
      __m256i key = order_key(s, !uniform);
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

}  // namespace

BlockScores score_block(const float* block, int64_t ld, int64_t rows, int64_t cols, const float* score_kernel,
                        float* tile, int32_t* keys) {
  if (uniform_kernel(score_kernel)) {
    const BlockScores scores = score_block_as(true, block, ld, rows, cols, score_kernel, tile, keys);
    if (finite_scores(scores)) return scores;
  }
  return score_block_as(false, block, ld, rows, cols, score_kernel, tile, keys);
}

void clear_mask_words(const Geometry& g, int64_t row_begin, int64_t row_end, uint64_t* words) {
  const int64_t C = g.chunks;
  if (row_begin >= row_end) return;
  std::memset(words + row_begin * C, 0, sizeof(uint64_t) * (row_end - row_begin) * C);
  for (int64_t m = row_begin / g.omega; m < C && g.begin(m) < row_end; ++m) {
    const int64_t begin = g.begin(m) > row_begin ? g.begin(m) : row_begin;
    const int64_t end = g.begin(m) + g.size(m) < row_end ? g.begin(m) + g.size(m) : row_end;
    for (int64_t i = begin; i < end; ++i) words[i * C + m] = low_bits(g.size(m));
  }
}

void select_upper_blocks(const Geometry& g, const Products& products, const float* logits, const float* score_kernel,
                         const KeepCounts& keep, const Team& team, Workspace& ws, uint64_t* words) {
  // Upper blocks have full rows; their columns are full or the last chunk.
  const BlockRank full = block_rank(keep.full, g.omega * g.omega), tail = block_rank(keep.tail, g.omega * g.last);
  for_my_chunks(g, team, [&](int64_t m) {
    for (int64_t n = m + 1; n < g.chunks;)
      n = select_group(g, products, logits, score_kernel, full, tail, m, n, ws, words);
  });
}

}  // namespace bspf::cpu::avx2
