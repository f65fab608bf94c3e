// The AVX2 path's matching (matching.h).
#include "matching.h"

#include <immintrin.h>

namespace bspf::cpu::avx2 {

void compute_match(const Geometry& g, const float* x, const float* logits, float scale, const Team& team,
                   Workspace& ws, int32_t* match, float* rho) {
  float* norm = ws.small.data;        // 64 + 8: padding lanes stay finite
  float* cosines = ws.small.data + 72;  // 64
  float* gram = ws.small.data + 136;  // 64×64
  const float magnitude = __builtin_fabsf(scale);
  const bool from_logits = magnitude >= 0x1p-60f && magnitude <= 0x1p60f;
  // Dividing by a power of two is multiplying by its reciprocal, bit for bit, and a vector
  // division costs several multiplications' throughput (the usual scale, 1/√64, is one).
  const bool power_of_two = (__builtin_bit_cast(uint32_t, magnitude) & 0x7FFFFFu) == 0;
  const __m256 vscale = _mm256_set1_ps(scale), inverse = _mm256_set1_ps(1.0f / scale);
  const __m256 eps = _mm256_set1_ps(kCosEps);
  const __m256 neg_inf = _mm256_set1_ps(-__builtin_inff());
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for_my_chunks(g, team, [&](int64_t c) {
    const int64_t b0 = g.begin(c), size = g.size(c), width = round_up8(size);
    // The vectors that read the chunk's rows of L: whole ones up to `width` (past the chunk,
    // the row's next columns, which no worker is writing now), unless the last would reach
    // past the row's end, into the next row, which another worker of a team may be
    // mirroring: then that one under a lane mask (0 in its place).
    const int64_t whole = b0 + width <= g.ld ? width : size & ~int64_t{7};
    for (int64_t a = 0; a < size; ++a) {
      float* ga = gram + a * 64;
      if (from_logits) {
        const float* la = logits + (b0 + a) * g.ld + b0;
        auto gram_row = [&](auto from_logit) {
          int64_t b = 0;
          for (; b < whole; b += kLanes) _mm256_storeu_ps(ga + b, from_logit(_mm256_loadu_ps(la + b)));
          if (b < size)
            _mm256_storeu_ps(ga + b, from_logit(_mm256_maskload_ps(la + b, _mm256_castps_si256(lane_mask(size - b)))));
        };
        if (power_of_two)
          gram_row([&](__m256 l) { return _mm256_mul_ps(l, inverse); });
        else
          gram_row([&](__m256 l) { return _mm256_div_ps(l, vscale); });
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
        // The first b reaching the maximum: the portable path's strict comparison. All
        // lanes' hits into one word, not a loop that stops at the first: where the maximum
        // lies is data, so such a loop's exit is mispredicted about every other row.
        const __m256 vt = _mm256_set1_ps(top);
        uint64_t hits = 0;
        for (int64_t b = 0; b < width; b += kLanes)
          hits |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(cosines + b), vt, _CMP_EQ_OQ)))
                  << b;
        best = __builtin_ctzll(hits);  // top is one of the cosines, so some lane hits
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
  });
}

}  // namespace bspf::cpu::avx2
