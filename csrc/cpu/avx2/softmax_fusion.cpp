// The AVX2 path's probabilities, fused weights and row sums (softmax_fusion.h).
#include "softmax_fusion.h"

#include <immintrin.h>

#include "gemm.h"

namespace bspf::cpu::avx2 {
namespace {

constexpr ByteLaneMasks make_byte_lane_masks() {
  ByteLaneMasks t{};
  for (int byte = 0; byte < 256; ++byte)
    for (int lane = 0; lane < 8; ++lane) t.lanes[byte][lane] = (byte >> lane & 1) ? -1 : 0;
  return t;
}

// Below this a row's sum of exps under the common shift is refused: the row's maximum is
// then more than 40 − ln N below the shift, and its entries near the maximum would come
// closer than e^-35 to float32's smallest normal number. Above it, whatever underflows
// weighs less than e^-35 of the row, far below float32's resolution of the sum.
constexpr float kSmallestSum = 4.24835426e-18f;  // e^-40

// A row of the forward is trusted when what float32 may have lost of it is below this
// fraction of its sum (2^-24, float32's unit roundoff).
constexpr float kResolution = 5.96046448e-8f;

// Row i of E with the row's own maximum as its shift, for the rows whose sum under the
// common shift is too small for float32 (a token of small norm beside one of large norm)
// or not finite: L_i recomputed from X into `row`, then E_i = exp(L_i − max_i) in place,
// 0 in the padding. Returns max_i.
float row_shifted_exps(const Geometry& g, const float* x, const float* xt, float scale, int64_t i, float* row) {
  logit_row(g, x, xt, scale, i, row);
  const int64_t full = g.n / kLanes * kLanes;
  const __m256 neg_inf = _mm256_set1_ps(-__builtin_inff());
  __m256 mx = neg_inf;
  for (int64_t j = 0; j < full; j += kLanes) mx = _mm256_max_ps(mx, _mm256_loadu_ps(row + j));
  if (full < g.n) mx = _mm256_max_ps(mx, _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(row + full), lane_mask(g.n - full)));
  const float row_max = hmax(mx);
  probs_row(g, row, row_max);
  return row_max;
}

// out[r] = ln values[r] for r in [0, count), count ≤ 64, 8 rows at a time (one logf call per
// row was a fifth of the forward's row sums). values: positive, normal and finite.
void log_rows(const float* values, int64_t count, float* out) {
  for (int64_t r = 0; r < count; r += kLanes) {
    const __m256 lanes = lane_mask(count - r);
    const __m256i lanes_i = _mm256_castps_si256(lanes);
    const __m256 v = _mm256_blendv_ps(_mm256_set1_ps(1.0f), _mm256_maskload_ps(values + r, lanes_i), lanes);
    _mm256_maskstore_ps(out + r, lanes_i, log256(v));
  }
}

}  // namespace

constexpr ByteLaneMasks kByteLaneMasks = make_byte_lane_masks();

namespace {

void probs_row(float* row, int64_t ld, int64_t n, float lse) {
  const __m256 vlse = _mm256_set1_ps(lse), zero = _mm256_setzero_ps();
  for (int64_t j = 0; j < ld; j += kLanes) {
    __m256 p = exp256(_mm256_min_ps(zero, _mm256_sub_ps(_mm256_loadu_ps(row + j), vlse)));
    if (j + kLanes > n) p = _mm256_and_ps(p, lane_mask(n - j));
    _mm256_storeu_ps(row + j, p);
  }
}

}  // namespace

void probs_row(const Geometry& g, float* row, float lse) { probs_row(row, g.ld, g.n, lse); }

void probs_rows(float* square, int64_t ld, int64_t n, const float* lse, int64_t row_begin, int64_t row_end) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    if (i < n)
      probs_row(square + i * ld, ld, n, lse[i]);
    else
      std::memset(square + i * ld, 0, sizeof(float) * ld);
  }
}

float logit_bound(const Geometry& g, const float* logits) {
  // Four diagonal entries per step into four running maxima (one running maximum was a
  // chain of dependent compares and selects, ~8 cycles per row), and NaN noted aside:
  // max_ps drops a NaN operand.
  const int64_t n = g.n, step = g.ld + 1;
  const __m128 magnitude = _mm_castsi128_ps(_mm_set1_epi32(0x7FFFFFFF));
  __m128 bound = _mm_setzero_ps(), unordered = bound;
  auto at = [&](int64_t i) { return i < n ? logits[i * step] : 0.0f; };
  for (int64_t i = 0; i < n; i += 4) {
    const __m128 diagonal = _mm_and_ps(magnitude, _mm_setr_ps(at(i), at(i + 1), at(i + 2), at(i + 3)));
    bound = _mm_max_ps(diagonal, bound);
    unordered = _mm_or_ps(unordered, _mm_cmpunord_ps(diagonal, diagonal));
  }
  if (_mm_movemask_ps(unordered)) return __builtin_nanf("");
  bound = _mm_max_ps(bound, _mm_movehl_ps(bound, bound));
  return _mm_cvtss_f32(_mm_max_ss(bound, _mm_shuffle_ps(bound, bound, 1)));
}

void upper_exps(float* square, int64_t ld, int64_t n, float shift, int64_t row_begin, int64_t row_end) {
  const __m256 vshift = _mm256_set1_ps(shift);
  for (int64_t i = row_begin; i < row_end; ++i) {
    float* e = square + i * ld;
    for (int64_t j = i & ~int64_t{7}; j < ld; j += kLanes) {
      __m256 v = _mm256_setzero_ps();
      if (i < n) {
        v = exp256(_mm256_sub_ps(_mm256_loadu_ps(e + j), vshift));
        if (j + kLanes > n) v = _mm256_and_ps(v, lane_mask(n - j));
      }
      _mm256_storeu_ps(e + j, v);
    }
  }
}

void row_sums(const float* row, int64_t ld, const uint64_t* bitmap, float* total, float* kept) {
  // Two vectors per step into two accumulators each: one chain of adds would wait on the
  // add latency.
  __m256 sum0 = _mm256_setzero_ps(), sum1 = sum0, kept0 = sum0, kept1 = sum0;
  int64_t j = 0;
  for (; j + 2 * kLanes <= ld; j += 2 * kLanes) {
    const uint32_t bits = static_cast<uint32_t>(bitmap[j / 64] >> (j % 64));
    const __m256 e0 = _mm256_loadu_ps(row + j), e1 = _mm256_loadu_ps(row + j + kLanes);
    sum0 = _mm256_add_ps(sum0, e0);
    sum1 = _mm256_add_ps(sum1, e1);
    kept0 = _mm256_add_ps(kept0, _mm256_and_ps(expand_bits(bits & 0xFFu), e0));
    kept1 = _mm256_add_ps(kept1, _mm256_and_ps(expand_bits(bits >> 8 & 0xFFu), e1));
  }
  if (j < ld) {
    const __m256 e = _mm256_loadu_ps(row + j);
    sum0 = _mm256_add_ps(sum0, e);
    kept0 = _mm256_add_ps(kept0, _mm256_and_ps(expand_bits(bitmap_byte(bitmap, j)), e));
  }
  *total = hsum(_mm256_add_ps(sum0, sum1));
  *kept = hsum(_mm256_add_ps(kept0, kept1));
}

// One column chunk at a time (H is constant per chunk), 8 columns per step under the
// chunk's moved bits. A chunk with nothing to move is not skipped: which ones are empty
// depends on the data, and the mispredicted branch cost more than adding +0 (a third of
// the fusion's time at the target shape).
//
// A chunk's last vector reaches past it (into the next chunk or the padding) with its bits
// 0 there, so it adds +0 to values ≥ 0 and changes nothing. A vector that would reach past
// the row's end (round_up8(N)) is read and written under a lane mask instead: past it lie
// the next row's first columns, which another worker of a team may be writing.
namespace {

// Of chunk c of a row (from column `begin`, `size` wide) the columns whose vectors of 8 lie
// within the row (c ≥ g.careful: before, all of them), and the lanes of the vector after
// them, from `column`, that do.
int64_t whole_vectors(const ChunkGrid& g, int64_t begin, int64_t size) {
  const int64_t within = g.ld - begin - (kLanes - 1);
  return size < within ? size : within;
}

__m256i lanes_within(const ChunkGrid& g, int64_t column) { return _mm256_castps_si256(lane_mask(g.ld - column)); }

}  // namespace

float fuse_row(const ChunkGrid& grid, const uint64_t* wi, const uint64_t* wp, float share, const float* source,
               float* target) {
  // The grid in a local: the stores into target might alias the caller's, so its fields
  // would be loaded again for every chunk.
  const ChunkGrid g = grid;
  __m256 added = _mm256_setzero_ps();
  // 8 columns of target plus their moved share of source.
  auto fused = [&](uint64_t moved, __m256 h, __m256 source_part, __m256 target_part) {
    const __m256 value =
        _mm256_and_ps(expand_bits(static_cast<uint32_t>(moved) & 0xFFu), _mm256_mul_ps(h, source_part));
    added = _mm256_add_ps(added, value);
    return _mm256_add_ps(target_part, value);
  };
  for (int64_t c = 0; c < g.chunks; ++c) {
    const FusionChunk chunk = fusion_chunk(g, wi, wp, c);
    uint64_t moved = chunk.moved;
    const __m256 h = _mm256_set1_ps(share * chunk.similarity);
    const float* s = source + chunk.begin;
    float* t = target + chunk.begin;
    // Chunks before `careful` in a loop of their own: one loop for all, as fused_grad_row's,
    // made the forward's rows stage 3% slower (tools/profile_cpu_stages.py --path avx2).
    if (c < g.careful) {
      for (int64_t j = 0; j < chunk.size; j += kLanes, moved >>= 8)  // a fixed count: predictable
        _mm256_storeu_ps(t + j, fused(moved, h, _mm256_loadu_ps(s + j), _mm256_loadu_ps(t + j)));
      continue;
    }
    const int64_t whole = whole_vectors(g, chunk.begin, chunk.size);
    int64_t j = 0;
    for (; j < whole; j += kLanes, moved >>= 8)
      _mm256_storeu_ps(t + j, fused(moved, h, _mm256_loadu_ps(s + j), _mm256_loadu_ps(t + j)));
    if (j < chunk.size) {
      const __m256i lanes = lanes_within(g, chunk.begin + j);
      _mm256_maskstore_ps(t + j, lanes,
                          fused(moved, h, _mm256_maskload_ps(s + j, lanes), _mm256_maskload_ps(t + j, lanes)));
    }
  }
  return hsum(added);
}

float fused_grad_row(const ChunkGrid& grid, const uint64_t* wi, const uint64_t* wp, float rho,
                     const float* probs_i, const float* grad_target, float* grad_i) {
  const ChunkGrid g = grid;  // in a local, as in fuse_row
  __m256 acc = _mm256_setzero_ps();
  const __m256 r = _mm256_set1_ps(rho);
  // grad_i's 8 columns with the moved ones' term added, and that term's part of dρ in acc.
  auto fused = [&](uint64_t moved, __m256 h, __m256 target_part, __m256 probs_part, __m256 gi) {
    const __m256 bits = expand_bits(static_cast<uint32_t>(moved) & 0xFFu);
    const __m256 h_gt = _mm256_mul_ps(h, target_part);
    acc = _mm256_add_ps(acc, _mm256_and_ps(bits, _mm256_mul_ps(h_gt, probs_part)));
    return _mm256_blendv_ps(gi, _mm256_fmadd_ps(r, h_gt, gi), bits);
  };
  for (int64_t c = 0; c < g.chunks; ++c) {  // no branch on an empty moved set: see fuse_row
    const FusionChunk chunk = fusion_chunk(g, wi, wp, c);
    uint64_t moved = chunk.moved;
    const __m256 h = _mm256_set1_ps(chunk.similarity);
    const int64_t end = chunk.begin + (c < g.careful ? chunk.size : whole_vectors(g, chunk.begin, chunk.size));
    int64_t j = chunk.begin;
    for (; j < end; j += kLanes, moved >>= 8)
      _mm256_storeu_ps(grad_i + j, fused(moved, h, _mm256_loadu_ps(grad_target + j), _mm256_loadu_ps(probs_i + j),
                                         _mm256_loadu_ps(grad_i + j)));
    if (j < chunk.begin + chunk.size) {
      const __m256i lanes = lanes_within(g, j);
      _mm256_maskstore_ps(grad_i + j, lanes,
                          fused(moved, h, _mm256_maskload_ps(grad_target + j, lanes),
                                _mm256_maskload_ps(probs_i + j, lanes), _mm256_maskload_ps(grad_i + j, lanes)));
    }
  }
  return hsum(acc);
}

void upper_exps_band(const Geometry& g, const Products& products, float shift, int64_t i0, float* square) {
  products.upper_exps(square, g.ld, g.n, shift, i0, i0 + 8);
}

void mirror_exps_band(const Geometry& g, int64_t i0, float* square) {
  for (int64_t j = 0; j < i0; j += 8) transpose8(square + j * g.ld + i0, g.ld, square + i0 * g.ld + j, g.ld);
}

void row_bitmap(const Geometry& g, const uint64_t* row_words, uint64_t* bitmap) {
  // The words are filled in registers and stored once each: or-ing into memory chunk by
  // chunk made every chunk wait on the previous one's store. The sizes are read into
  // locals first: the stores into bitmap might alias g's fields (int64_t and uint64_t
  // may), which would be loaded again after each.
  const int64_t count = bitmap_words(g), omega = g.omega, chunks = g.chunks, last = g.last;
  if ((omega & (omega - 1)) == 0) {  // Ω a power of two (≤ 64): whole chunks per word, no spill
    const int64_t per_word = 64 >> __builtin_ctzll(static_cast<uint64_t>(omega));  // no division per row
    for (int64_t w = 0, c = 0; w < count; ++w) {
      uint64_t word = 0;
      for (int64_t t = 0; t < per_word && c < chunks; ++t, ++c) word |= row_words[c] << (t * omega);
      bitmap[w] = word;
    }
    return;
  }
  uint64_t word = 0, next = 0;  // bitmap[w], and what spills into bitmap[w + 1]
  int64_t w = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t at = c * omega, shift = at % 64, size = c == chunks - 1 ? last : omega;
    if (at / 64 > w) {  // at most one word on: a chunk is at most 64 wide
      bitmap[w++] = word;
      word = next;
      next = 0;
    }
    const uint64_t bits = row_words[c];
    word |= bits << shift;
    if (shift + size > 64) next |= bits >> (64 - shift);
  }
  bitmap[w++] = word;
  for (; w < count; ++w, next = 0) bitmap[w] = next;
}

void chunk_weights(const Geometry& g, const Products& products, int64_t m, const float* probs, const uint64_t* words,
                   const int32_t* match, const float* rho, bool fuse, uint64_t* bitmaps, float* weights) {
  const int64_t r0 = g.begin(m), rows = g.size(m), bw = bitmap_words(g);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r0 + r;
    uint64_t* bitmap = bitmaps + r * bw;
    row_bitmap(g, words + i * g.chunks, bitmap);
    const float* p = probs + i * g.ld;
    float* w = weights + r * g.ld;
    uint64_t bits = 0;
    for (int64_t j = 0; j < g.ld; j += kLanes) {
      if (j % 64 == 0) bits = bitmap[j / 64];
      _mm256_storeu_ps(w + j, _mm256_and_ps(expand_bits(static_cast<uint32_t>(bits) & 0xFFu), _mm256_loadu_ps(p + j)));
      bits >>= 8;
    }
  }
  if (!fuse) return;
  const ChunkGrid grid = g.grid();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r0 + r, target_row = match[i] - r0;
    if (target_row == r || !(rho[i] > 0.0f)) continue;
    products.fuse_row(grid, words + i * g.chunks, words + match[i] * g.chunks, rho[i], probs + i * g.ld,
                      weights + target_row * g.ld);
  }
}

bool chunk_forward_rows(const Geometry& g, const Products& products, int64_t m, const float* x, const float* xt,
                        float scale, float shift, float* exps, const uint64_t* words, const int32_t* match,
                        const float* rho, bool fuse, uint64_t* bitmaps, float* lse, float* log_row_sum, float* alpha) {
  const int64_t r0 = g.begin(m), rows = g.size(m), bw = bitmap_words(g);
  float total[64], log_total[64], kept[64], log_kept[64], lost[64], row_shift[64];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r0 + r;
    uint64_t* bitmap = bitmaps + r * bw;
    row_bitmap(g, words + i * g.chunks, bitmap);
    float* row = exps + i * g.ld;
    row_shift[r] = shift;
    for (int attempt = 0; attempt < 2; ++attempt) {
      products.row_sums(row, g.ld, bitmap, &total[r], &kept[r]);
      if (total[r] >= kSmallestSum && total[r] <= __FLT_MAX__) break;
      row_shift[r] = row_shifted_exps(g, x, xt, scale, i, row);
    }
    if (!(total[r] >= kSmallestSum && total[r] <= __FLT_MAX__)) return false;  // not finite: X is not
    lost[r] = 1.0f;
  }
  log_rows(total, rows, log_total);
  for (int64_t r = 0; r < rows; ++r) lse[r] = row_shift[r] + log_total[r];
  if (fuse) {
    const ChunkGrid grid = g.grid();
    // In place: a row's fused-into entries are ones it keeps, its fused-out entries ones it prunes.
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = r0 + r, target_row = match[i] - r0;
      if (target_row == r || !(rho[i] > 0.0f)) continue;
      const float share = rho[i] * (total[target_row] / total[r]);
      kept[target_row] += products.fuse_row(grid, words + i * g.chunks, words + match[i] * g.chunks, share,
                                            exps + i * g.ld, exps + match[i] * g.ld);
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
  }
  log_rows(kept, rows, log_kept);
  for (int64_t r = 0; r < rows; ++r) {
    log_row_sum[r] = log_kept[r] - log_total[r];
    // The backward hands such a pair to the portable path, which recomputes the logits in
    // its own order: the forward goes there too, so lse and the logits agree.
    if (!(log_row_sum[r] >= kSmallestLogRowSum)) return false;
    alpha[r] = 1.0f / kept[r];
  }
  return true;
}

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

}  // namespace bspf::cpu::avx2
