// The surrogate gradient of the 3×3 score kernel W (docs/spec.md §4a) on the CPU, portable
// C++ for float and double, one (batch, head) pair per work item.
//
// Per pair: the logits once; (P + Φ)/Z and D = Z·dR for every entry (dR as in §4, with
// every ratio of probabilities formed as one exponent from the saved lse and log Z);
// G = ∂loss/∂M from them; then for each upper block with a choice its scores S, τ_b,
// T_b, dS and the pair's share of dW. Each pair's dW is summed in double, and the pairs'
// sums are added in pair order, so the result does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <vector>

#include "bspf/cpu.h"
#include "bspf/validate.h"
#include "pair_steps.h"
#include "parallel.h"

namespace bspf::cpu {
namespace {

using portable::Chunks;

// exp of a log-ratio of probabilities, bounded below the type's overflow: reached only at
// extreme logits, where a fused share outweighs its target row's whole mass (which the
// reference's linear form cannot represent either).
template <typename T> struct ExpBound;  // log(max) − 8
template <> struct ExpBound<float> { static constexpr float value = 80.72283935546875f; };
template <> struct ExpBound<double> { static constexpr double value = 701.782712893384; };

template <typename T>
T bounded_exp(T x) {
  return std::exp(std::min(x, ExpBound<T>::value));
}

template <typename T>
struct PairBuffers {
  std::vector<T> x, v, g, columns, logits, gain, grad_r, tile, scores, ranked;
};

// out = alpha · A Bᵀ (n × n) for row-major A and B (n × d). Row by row through Bᵀ, so the
// innermost loop runs over independent outputs and vectorises; a dot product per entry
// would be one long dependency chain.
template <typename T>
void products(const std::vector<T>& a, const std::vector<T>& b, int64_t n, int64_t d, T alpha,
              std::vector<T>& columns, std::vector<T>& out) {
  columns.resize(d * n);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t k = 0; k < d; ++k) columns[k * n + j] = b[j * d + k];
  out.assign(n * n, T(0));
  for (int64_t i = 0; i < n; ++i) {
    T* row = &out[i * n];
    for (int64_t k = 0; k < d; ++k) {
      const T aik = a[i * d + k];
      const T* column = &columns[k * n];
      for (int64_t j = 0; j < n; ++j) row[j] += aik * column[j];
    }
    if (alpha != T(1))
      for (int64_t j = 0; j < n; ++j) row[j] *= alpha;
  }
}

// Pointers into the saved buffers of one pair.
template <typename T>
struct PairSaved {
  const uint64_t* words;
  const int32_t* match;
  const T *rho, *lse, *log_z;
  PairSaved(const Saved& s, int64_t pair, int64_t n, int64_t chunks)
      : words(s.mask_words + pair * n * chunks),
        match(s.match + pair * n),
        rho(static_cast<const T*>(s.rho) + pair * n),
        lse(static_cast<const T*>(s.lse) + pair * n),
        log_z(static_cast<const T*>(s.log_row_sum) + pair * n) {}
  // α(i, j) = ρ_i · H_{i, n(j)} for j in chunk c; 0 for a token alone in its chunk.
  T alpha(int64_t i, const Chunks& ch, int64_t c) const {
    const int64_t p = match[i];
    if (p == i) return T(0);
    const uint64_t differ = words[i * ch.count + c] ^ words[p * ch.count + c];
    return rho[i] * (T(1) - static_cast<T>(portable::popcount(differ)) / static_cast<T>(ch.size(c)));
  }
};

// gain(p, j) = (P(p, j) + [fuse]·Φ(p, j)) / Z_p for every entry: what keeping (p, j) adds
// to row p, relative to the row's sum (docs/spec.md §4a).
template <typename T>
void compute_gain(const std::vector<T>& logits, const Chunks& ch, const PairSaved<T>& s, bool fuse,
                  std::vector<T>& gain) {
  const int64_t n = ch.n, C = ch.count;
  gain.resize(n * n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      gain[i * n + j] = bounded_exp(std::min(logits[i * n + j] - s.lse[i], T(0)) - s.log_z[i]);
  if (!fuse) return;
  // Φ(p, j) gathers the shares of the pruned entries of the rows i matched to p, kept or
  // not at (p, j).
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = s.match[i];
    for (int64_t c = 0; c < C; ++c) {
      uint64_t pruned = ~s.words[i * C + c] & portable::low_bits(ch.size(c));
      if (!pruned) continue;
      const T alpha = s.alpha(i, ch, c);
      if (alpha == T(0)) continue;
      for (; pruned; pruned &= pruned - 1) {
        const int64_t j = ch.begin(c) + __builtin_ctzll(pruned);
        gain[p * n + j] += alpha * bounded_exp(std::min(logits[i * n + j] - s.lse[i], T(0)) - s.log_z[p]);
      }
    }
  }
}

// D(i, j) = dA(i, j) − Σ_k A(i, k)·dA(i, k) = Z_i · dR(i, j), for every entry (§4's dR with
// A = M ⊙ gain). grad_r holds dA on entry.
template <typename T>
void compute_scaled_grad_r(const std::vector<T>& gain, const Chunks& ch, const PairSaved<T>& s,
                           std::vector<T>& grad_r) {
  const int64_t n = ch.n, C = ch.count;
  for (int64_t i = 0; i < n; ++i) {
    T* row = &grad_r[i * n];
    T a_dot_da = 0;
    for (int64_t c = 0; c < C; ++c)
      for (uint64_t kept = s.words[i * C + c]; kept; kept &= kept - 1) {
        const int64_t j = ch.begin(c) + __builtin_ctzll(kept);
        a_dot_da += gain[i * n + j] * row[j];
      }
    for (int64_t j = 0; j < n; ++j) row[j] -= a_dot_da;
  }
}

// gain becomes G(p, j) = ∂loss/∂M(p, j) in place (each entry reads only its own gain):
// Z_p·dR(p, j)·gain(p, j), less, when fused, the share row p then no longer gives to the
// row b(p) that keeps j.
template <typename T>
void compute_mask_gradient(const std::vector<T>& logits, const std::vector<T>& grad_r, const Chunks& ch,
                           const PairSaved<T>& s, bool fuse, std::vector<T>& gain) {
  const int64_t n = ch.n, C = ch.count;
  for (int64_t e = 0; e < n * n; ++e) gain[e] *= grad_r[e];
  if (!fuse) return;
  for (int64_t p = 0; p < n; ++p) {
    const int64_t q = s.match[p];
    for (int64_t c = 0; c < C; ++c) {
      const T alpha = s.alpha(p, ch, c);
      if (alpha == T(0)) continue;
      for (uint64_t target = s.words[q * C + c]; target; target &= target - 1) {
        const int64_t j = ch.begin(c) + __builtin_ctzll(target);
        gain[p * n + j] -= alpha * bounded_exp(std::min(logits[p * n + j] - s.lse[p], T(0)) - s.log_z[q]) *
                           grad_r[q * n + j];
      }
    }
  }
}

// Adds the upper block's share of dW to dw (double): dS(i, j)·L(i + a − 1, j + b − 1) over
// its entries, dS from the relaxation σ((S − τ_b)/T_b) and both entries S(i, j) decides.
template <typename T>
void add_block(const std::vector<T>& logits, const std::vector<T>& grad_mask, const T* w, int64_t n, int64_t r0,
               int64_t rows, int64_t c0, int64_t cols, int64_t k, PairBuffers<T>& buf, double* dw) {
  const int64_t count = rows * cols, pitch = cols + 2;
  // The block's logits with a border of zeros (the 3×3 kernel's padding, SPEC §3.2): the
  // taps of entry (i, j) are tile[(i + a)·pitch + j + b].
  std::vector<T>& tile = buf.tile;
  tile.assign((rows + 2) * pitch, T(0));
  for (int64_t i = 0; i < rows; ++i)
    std::copy_n(&logits[(r0 + i) * n + c0], cols, &tile[(i + 1) * pitch + 1]);
  std::vector<T>& scores = buf.scores;
  scores.resize(count);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      T score = 0;
      for (int a = 0; a < 3; ++a)
        for (int b = 0; b < 3; ++b) score += w[a * 3 + b] * tile[(i + a) * pitch + j + b];
      scores[i * cols + j] = score;
    }
  // τ_b midway between the k-th and (k+1)-th largest scores (a NaN ranks last, as in the
  // forward's selection).
  std::vector<T>& ranked = buf.ranked;
  ranked.assign(scores.begin(), scores.end());
  for (T& score : ranked)
    if (std::isnan(score)) score = -std::numeric_limits<T>::infinity();
  std::nth_element(ranked.begin(), ranked.begin() + (k - 1), ranked.end(), std::greater<T>());
  const T kth = ranked[k - 1];
  const T next = *std::max_element(ranked.begin() + k, ranked.end());
  const T threshold = (kth + next) / T(2);
  if (!std::isfinite(threshold)) return;
  // T_b: the population standard deviation of the block's scores.
  double mean = 0, var = 0;
  for (T score : scores) mean += score;
  mean /= static_cast<double>(count);
  for (T score : scores) var += (score - mean) * (score - mean);
  const T spread = static_cast<T>(std::sqrt(var / static_cast<double>(count)));
  if (!(spread > T(0))) return;

  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const T sig = T(1) / (T(1) + std::exp(-(scores[i * cols + j] - threshold) / spread));
      // An upper entry decides itself and its mirror.
      const T upstream = grad_mask[(r0 + i) * n + c0 + j] + grad_mask[(c0 + j) * n + r0 + i];
      const double grad_score = static_cast<double>(upstream * (sig * (T(1) - sig) / spread));
      if (grad_score == 0.0) continue;
      for (int a = 0; a < 3; ++a)
        for (int b = 0; b < 3; ++b)
          dw[a * 3 + b] += grad_score * tile[(i + a) * pitch + j + b];
    }
}

template <typename T>
void pair_gradient(const ScoreKernelGradParams& sp, int64_t pair, PairBuffers<T>& buf, double* dw) {
  const Problem& p = sp.p;
  const Chunks ch(p.seqlen, p.block_size);
  const int64_t n = p.seqlen, d = p.head_dim, dv = p.value_dim;
  const int64_t b = pair / p.heads, h = pair % p.heads;
  const PairSaved<T> s(sp.saved, pair, n, ch.count);
  const T* w = static_cast<const T*>(sp.score_kernel);

  portable::gather_rows(static_cast<const T*>(sp.qk), sp.qk_stride, b, h, n, d, buf.x);
  portable::gather_rows(static_cast<const T*>(sp.v), sp.v_stride, b, h, n, dv, buf.v);
  portable::gather_rows(static_cast<const T*>(sp.grad_out), sp.grad_out_stride, b, h, n, dv, buf.g);
  products(buf.x, buf.x, n, d, static_cast<T>(p.scale), buf.columns, buf.logits);
  products(buf.g, buf.v, n, dv, T(1), buf.columns, buf.grad_r);  // dA
  compute_gain(buf.logits, ch, s, p.fuse, buf.gain);
  compute_scaled_grad_r(buf.gain, ch, s, buf.grad_r);
  compute_mask_gradient(buf.logits, buf.grad_r, ch, s, p.fuse, buf.gain);
  const std::vector<T>& grad_mask = buf.gain;

  std::fill(dw, dw + 9, 0.0);
  for (int64_t m = 0; m < ch.count; ++m)
    for (int64_t c = m + 1; c < ch.count; ++c) {
      const int64_t rows = ch.size(m), cols = ch.size(c);
      const int64_t k = keep_count(sp.keep_ratio, rows, cols);
      if (k < 1 || k >= rows * cols) continue;  // no choice, no relaxation
      add_block(buf.logits, grad_mask, w, n, ch.begin(m), rows, ch.begin(c), cols, k, buf, dw);
    }
}

template <typename T>
void score_kernel_grad_impl(const ScoreKernelGradParams& sp) {
  const int64_t pairs = sp.p.pairs();
  std::vector<double> partial(pairs * 9, 0.0);
  std::vector<PairBuffers<T>> buffers(worker_count(pairs, sp.num_threads));
  parallel_for(pairs, sp.num_threads, [&](int64_t pair, int32_t worker) {
    pair_gradient<T>(sp, pair, buffers[worker], &partial[pair * 9]);
  });
  double total[9] = {};
  for (int64_t pair = 0; pair < pairs; ++pair)
    for (int t = 0; t < 9; ++t) total[t] += partial[pair * 9 + t];
  T* out = static_cast<T*>(sp.grad_score_kernel);
  for (int t = 0; t < 9; ++t) out[t] = static_cast<T>(total[t]);
}

}  // namespace

void score_kernel_grad(const ScoreKernelGradParams& params) {
  validate(params);
  switch (params.p.dtype) {
    case DType::kFloat32: return score_kernel_grad_impl<float>(params);
    case DType::kFloat64: return score_kernel_grad_impl<double>(params);
    default: throw std::invalid_argument("bspf CPU kernels support float32 and float64 only");
  }
}

}  // namespace bspf::cpu
