// The portable CPU path: SPEC §3 (forward) and §4 (backward) written plainly, one
// (batch, head) pair per work item, for float and double. This is the correctness
// baseline the SIMD path is tested against, so clarity wins over speed here.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <utility>
#include <vector>

#include "kernels.h"
#include "pair_steps.h"
#include "parallel.h"

namespace bspf::cpu::scalar {
namespace {

using portable::Chunks;
using portable::gather_rows;
using portable::low_bits;
using portable::popcount;

template <typename T>
T dot(const T* a, const T* b, int64_t d) {
  T s = 0;
  for (int64_t k = 0; k < d; ++k) s += a[k] * b[k];
  return s;
}

// L = scale · X Xᵀ. Only the upper triangle is computed; the lower one is its mirror.
template <typename T>
void compute_logits(const std::vector<T>& x, int64_t n, int64_t d, T scale, std::vector<T>& logits) {
  logits.resize(n * n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i; j < n; ++j) {
      const T l = scale * dot(&x[i * d], &x[j * d], d);
      logits[i * n + j] = l;
      logits[j * n + i] = l;
    }
}

// SPEC §3.2–3.3 on the upper blocks, mirrored, diagonal full: writes N×C mask words.
template <typename T>
void compute_mask_words(const std::vector<T>& logits, const Chunks& ch, const T* score_kernel,
                        double keep_ratio, uint64_t* words) {
  const int64_t n = ch.n, C = ch.count;
  std::fill(words, words + n * C, uint64_t{0});
  for (int64_t m = 0; m < C; ++m)
    for (int64_t i = ch.begin(m); i < ch.begin(m) + ch.size(m); ++i) words[i * C + m] = low_bits(ch.size(m));

  std::vector<std::pair<T, int64_t>> scored;
  for (int64_t m = 0; m < C; ++m) {
    const int64_t r0 = ch.begin(m), rows = ch.size(m);
    for (int64_t bn = m + 1; bn < C; ++bn) {
      const int64_t c0 = ch.begin(bn), cols = ch.size(bn);
      const int64_t k = keep_count(keep_ratio, rows, cols);
      if (k <= 0) continue;
      scored.clear();
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) {
          T s = 0;
          for (int a = -1; a <= 1; ++a) {
            const int64_t ii = i + a;
            if (ii < 0 || ii >= rows) continue;
            for (int bb = -1; bb <= 1; ++bb) {
              const int64_t jj = j + bb;
              if (jj < 0 || jj >= cols) continue;
              s += score_kernel[(a + 1) * 3 + (bb + 1)] * logits[(r0 + ii) * n + (c0 + jj)];
            }
          }
          // A NaN score must not break the ordering: it ranks last.
          if (std::isnan(s)) s = -std::numeric_limits<T>::infinity();
          scored.emplace_back(s, i * cols + j);
        }
      if (k < static_cast<int64_t>(scored.size())) {
        // Larger score first; the smaller row-major index wins a tie (SPEC §3.3).
        auto better = [](const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& b) {
          return a.first > b.first || (a.first == b.first && a.second < b.second);
        };
        std::nth_element(scored.begin(), scored.begin() + (k - 1), scored.end(), better);
      }
      const int64_t kept = std::min<int64_t>(k, scored.size());
      for (int64_t e = 0; e < kept; ++e) {
        const int64_t i = scored[e].second / cols, j = scored[e].second % cols;
        words[(r0 + i) * C + bn] |= uint64_t{1} << j;  // upper block
        words[(c0 + j) * C + m] |= uint64_t{1} << i;   // its mirror
      }
    }
  }
}

// SPEC §3.5: b(i) and ρ_i within each chunk.
template <typename T>
void compute_match(const std::vector<T>& x, const Chunks& ch, int64_t d, int32_t* match, T* rho) {
  std::vector<T> norm(ch.n);
  for (int64_t i = 0; i < ch.n; ++i) norm[i] = std::sqrt(dot(&x[i * d], &x[i * d], d));
  for (int64_t c = 0; c < ch.count; ++c) {
    const int64_t b0 = ch.begin(c), size = ch.size(c);
    for (int64_t i = b0; i < b0 + size; ++i) {
      int64_t best = i;
      T best_cos = -std::numeric_limits<T>::infinity();
      for (int64_t j = b0; j < b0 + size; ++j) {
        if (j == i) continue;
        const T cos = dot(&x[i * d], &x[j * d], d) / std::max(norm[i] * norm[j], static_cast<T>(kCosineEps));
        if (best == i || cos > best_cos) {  // strict: the smaller index keeps a tie
          best = j;
          best_cos = cos;
        }
      }
      match[i] = static_cast<int32_t>(best);
      rho[i] = best == i ? T(0) : std::max(best_cos, T(0));
    }
  }
}

// Row log-sum-exp of the full logit row (SPEC §3.4).
template <typename T>
void compute_lse(const std::vector<T>& logits, int64_t n, T* lse) {
  for (int64_t i = 0; i < n; ++i) {
    const T* row = &logits[i * n];
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, row[j]);
    T sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += std::exp(row[j] - mx);
    lse[i] = mx + std::log(sum);
  }
}

// Turns logits into log P in place: log P(i, j) = L(i, j) − lse_i. Finite for finite logits
// however large, where P itself may underflow (SPEC §6, extreme logits). Capped at 0: at
// logits of 1e8, float32's rounding can put L above lse (std::min keeps a NaN in its first
// argument).
template <typename T>
void logits_to_log_probs(std::vector<T>& logits, int64_t n, const T* lse) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) logits[i * n + j] = std::min(logits[i * n + j] - lse[i], T(0));
}

// Calls fn(j, similarity) for every pruned entry (i, j) whose target (b(i), j) is kept,
// with similarity = H_{i,n(j)}; the fused share is ρ_i · H · P(i, j) (SPEC §3.6–3.7). Shared by the forward and the backward so
// they agree on which entries move where.
template <typename T, typename Fn>
void for_each_fused_entry(int64_t i, const Chunks& ch, const uint64_t* words, const int32_t* match,
                          const T* rho, Fn&& fn) {
  const int64_t C = ch.count, p = match[i];
  if (p == i || !(rho[i] > T(0))) return;
  const int64_t own = i / ch.omega;
  for (int64_t c = 0; c < C; ++c) {
    if (c == own) continue;
    const uint64_t wi = words[i * C + c], wp = words[p * C + c];
    uint64_t moved = ~wi & wp & low_bits(ch.size(c));
    if (!moved) continue;
    const T similarity = T(1) - static_cast<T>(popcount(wi ^ wp)) / static_cast<T>(ch.size(c));
    for (; moved; moved &= moved - 1) fn(ch.begin(c) + __builtin_ctzll(moved), similarity);
  }
}

// R = P ⊙ M + F (SPEC §3.8) is evaluated in log space: each of its terms, P(p, j) on a kept
// entry and ρ_i · H · P(i, j) fused into row p = b(i), is exp(its log − shift_p), so that
// no row underflows whole when its mass sits on pruned entries. A = R / Z does not depend
// on the shift.

// shift_p = the log of row p's largest term: R_p / exp(shift_p) then has entries <= 1
// and a sum >= 1.
template <typename T>
void row_shifts(const std::vector<T>& log_probs, const Chunks& ch, const uint64_t* words, const int32_t* match,
                const T* rho, bool fuse, std::vector<T>& shift) {
  const int64_t n = ch.n, C = ch.count;
  shift.assign(n, -std::numeric_limits<T>::infinity());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < C; ++c)
      for (uint64_t w = words[i * C + c]; w; w &= w - 1)
        shift[i] = std::max(shift[i], log_probs[i * n + ch.begin(c) + __builtin_ctzll(w)]);
  if (!fuse) return;
  for (int64_t i = 0; i < n; ++i) {
    T& target = shift[match[i]];
    for_each_fused_entry(i, ch, words, match, rho, [&](int64_t j, T similarity) {
      target = std::max(target, log_probs[i * n + j] + std::log(rho[i] * similarity));
    });
  }
}

// R_p / exp(shift_p) for every row p. With the forward's row_shifts its entries are at
// most 1; with log Z as the shift (the backward) it is A itself.
template <typename T>
void compute_weights(const std::vector<T>& log_probs, const Chunks& ch, const uint64_t* words,
                     const int32_t* match, const T* rho, bool fuse, const T* shift, std::vector<T>& weights) {
  const int64_t n = ch.n, C = ch.count;
  weights.assign(n * n, T(0));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < C; ++c)
      for (uint64_t w = words[i * C + c]; w; w &= w - 1) {
        const int64_t j = ch.begin(c) + __builtin_ctzll(w);
        weights[i * n + j] = std::exp(log_probs[i * n + j] - shift[i]);
      }
  if (!fuse) return;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = match[i];
    T* target = &weights[p * n];
    for_each_fused_entry(i, ch, words, match, rho, [&](int64_t j, T similarity) {
      target[j] += std::exp(log_probs[i * n + j] + std::log(rho[i] * similarity) - shift[p]);
    });
  }
}

template <typename T>
struct Workspace {
  std::vector<T> x, v, g, logits, weights, grad_weights, shift;
};

template <typename T>
void mask_impl(const ForwardParams& fp) {
  const Problem& p = fp.p;
  const Chunks ch(p.seqlen, p.block_size);
  const int64_t n = p.seqlen, d = p.head_dim;
  std::vector<Workspace<T>> ws(worker_count(p.pairs(), fp.num_threads));
  parallel_for(p.pairs(), fp.num_threads, [&](int64_t pair, int32_t worker) {
    Workspace<T>& w = ws[worker];
    const int64_t b = pair / p.heads, h = pair % p.heads;
    gather_rows(static_cast<const T*>(fp.qk), fp.qk_stride, b, h, n, d, w.x);
    compute_logits(w.x, n, d, static_cast<T>(p.scale), w.logits);
    compute_mask_words(w.logits, ch, static_cast<const T*>(fp.score_kernel), fp.keep_ratio,
                       fp.saved.mask_words + pair * n * ch.count);
  });
}

template <typename T>
void forward_pair(const ForwardParams& fp, int64_t pair, Workspace<T>& w) {
  const Problem& p = fp.p;
  const Chunks ch(p.seqlen, p.block_size);
  const int64_t n = p.seqlen, d = p.head_dim, dv = p.value_dim;
  const int64_t b = pair / p.heads, h = pair % p.heads;
  uint64_t* words = fp.saved.mask_words + pair * n * ch.count;
  int32_t* match = fp.saved.match + pair * n;
  T* rho = static_cast<T*>(fp.saved.rho) + pair * n;
  T* lse = static_cast<T*>(fp.saved.lse) + pair * n;
  T* log_row_sum = static_cast<T*>(fp.saved.log_row_sum) + pair * n;
  T* out = static_cast<T*>(fp.out) + pair * n * dv;

  gather_rows(static_cast<const T*>(fp.qk), fp.qk_stride, b, h, n, d, w.x);
  gather_rows(static_cast<const T*>(fp.v), fp.v_stride, b, h, n, dv, w.v);
  compute_logits(w.x, n, d, static_cast<T>(p.scale), w.logits);
  compute_mask_words(w.logits, ch, static_cast<const T*>(fp.score_kernel), fp.keep_ratio, words);
  compute_match(w.x, ch, d, match, rho);
  compute_lse(w.logits, n, lse);
  logits_to_log_probs(w.logits, n, lse);
  row_shifts(w.logits, ch, words, match, rho, p.fuse, w.shift);
  compute_weights(w.logits, ch, words, match, rho, p.fuse, w.shift.data(), w.weights);

  for (int64_t i = 0; i < n; ++i) {
    const T* r = &w.weights[i * n];
    T z = 0;  // >= 1: the row's largest term is exp(0)
    for (int64_t j = 0; j < n; ++j) z += r[j];
    log_row_sum[i] = w.shift[i] + std::log(z);
    T* o = out + i * dv;
    std::fill(o, o + dv, T(0));
    for (int64_t c = 0; c < ch.count; ++c)
      for (uint64_t m = words[i * ch.count + c]; m; m &= m - 1) {
        const int64_t j = ch.begin(c) + __builtin_ctzll(m);
        const T a = r[j] / z;
        for (int64_t k = 0; k < dv; ++k) o[k] += a * w.v[j * dv + k];
      }
  }
}

template <typename T>
void backward_pair(const BackwardParams& bp, int64_t pair, Workspace<T>& w) {
  const Problem& p = bp.p;
  const Chunks ch(p.seqlen, p.block_size);
  const int64_t n = p.seqlen, d = p.head_dim, dv = p.value_dim, C = ch.count;
  const T scale = static_cast<T>(p.scale);
  const int64_t b = pair / p.heads, h = pair % p.heads;
  const uint64_t* words = bp.saved.mask_words + pair * n * C;
  const int32_t* match = bp.saved.match + pair * n;
  const T* rho = static_cast<const T*>(bp.saved.rho) + pair * n;
  const T* lse = static_cast<const T*>(bp.saved.lse) + pair * n;
  const T* log_z = static_cast<const T*>(bp.saved.log_row_sum) + pair * n;
  T* grad_qk = static_cast<T*>(bp.grad_qk) + pair * n * d;
  T* grad_v = static_cast<T*>(bp.grad_v) + pair * n * dv;

  gather_rows(static_cast<const T*>(bp.qk), bp.qk_stride, b, h, n, d, w.x);
  gather_rows(static_cast<const T*>(bp.v), bp.v_stride, b, h, n, dv, w.v);
  gather_rows(static_cast<const T*>(bp.grad_out), bp.grad_out_stride, b, h, n, dv, w.g);
  compute_logits(w.x, n, d, scale, w.logits);
  logits_to_log_probs(w.logits, n, lse);  // w.logits now holds log P
  const std::vector<T>& log_probs = w.logits;
  compute_weights(log_probs, ch, words, match, rho, p.fuse, log_z, w.weights);  // A

  // dV = Aᵀ G and, on kept entries, D(i, j) = dA(i, j) − Σ_k A(i, k) dA(i, k) = Z_i · dR(i, j).
  std::vector<T>& grad_r = w.grad_weights;
  grad_r.assign(n * n, T(0));
  std::fill(grad_v, grad_v + n * dv, T(0));
  for (int64_t i = 0; i < n; ++i) {
    T a_dot_da = 0;
    for (int64_t c = 0; c < C; ++c)
      for (uint64_t m = words[i * C + c]; m; m &= m - 1) {
        const int64_t j = ch.begin(c) + __builtin_ctzll(m);
        const T a = w.weights[i * n + j];
        const T da = dot(w.g.data() + i * dv, w.v.data() + j * dv, dv);  // data(): Dv may be 0
        grad_r[i * n + j] = da;
        a_dot_da += a * da;
        for (int64_t k = 0; k < dv; ++k) grad_v[j * dv + k] += a * w.g[i * dv + k];
      }
    for (int64_t c = 0; c < C; ++c)
      for (uint64_t m = words[i * C + c]; m; m &= m - 1) {
        const int64_t j = ch.begin(c) + __builtin_ctzll(m);
        grad_r[i * n + j] -= a_dot_da;
      }
  }

  // P ⊙ dP (SPEC §4), each term formed in log space like A: a kept entry gives
  // exp(log P(i, j) − log Z_i) · D(i, j), a pruned one that moves to p = b(i) gives
  // exp(log(ρ_i H P(i, j)) − log Z_p) · D(p, j). dρ_i gathers the latter divided by ρ_i.
  // It overwrites the weights buffer (A is no longer needed).
  std::vector<T>& p_dp = w.weights;
  p_dp.assign(n * n, T(0));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < C; ++c)
      for (uint64_t m = words[i * C + c]; m; m &= m - 1) {
        const int64_t j = ch.begin(c) + __builtin_ctzll(m);
        p_dp[i * n + j] = std::exp(log_probs[i * n + j] - log_z[i]) * grad_r[i * n + j];
      }
  std::vector<T> grad_rho(n, T(0));
  if (p.fuse)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = match[i];
      const T* grad_target = &grad_r[t * n];
      T acc = 0;
      for_each_fused_entry(i, ch, words, match, rho, [&](int64_t j, T similarity) {
        const T moved = std::exp(log_probs[i * n + j] + std::log(rho[i] * similarity) - log_z[t]) * grad_target[j];
        p_dp[i * n + j] += moved;
        acc += moved;
      });
      grad_rho[i] = acc / rho[i];
    }

  // dL = P ⊙ dP − P ⊙ rowsum(P ⊙ dP), then dX = scale · (dL + dLᵀ) X.
  std::vector<T>& grad_l = p_dp;  // in place
  for (int64_t i = 0; i < n; ++i) {
    T s = 0;
    for (int64_t j = 0; j < n; ++j) s += p_dp[i * n + j];
    for (int64_t j = 0; j < n; ++j) grad_l[i * n + j] = p_dp[i * n + j] - std::exp(log_probs[i * n + j]) * s;
  }
  std::fill(grad_qk, grad_qk + n * d, T(0));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const T sym = scale * (grad_l[i * n + j] + grad_l[j * n + i]);
      if (sym == T(0)) continue;
      for (int64_t k = 0; k < d; ++k) grad_qk[i * d + k] += sym * w.x[j * d + k];
    }

  // The cosine behind ρ_i = max(cos(x_i, x_b(i)), 0) (SPEC §4, last line).
  for (int64_t i = 0; i < n; ++i) {
    const int64_t q = match[i];
    if (q == i || !(rho[i] > T(0)) || grad_rho[i] == T(0)) continue;
    const T* xi = &w.x[i * d];
    const T* xq = &w.x[q * d];
    const T nx = std::sqrt(dot(xi, xi, d)), nq = std::sqrt(dot(xq, xq, d));
    const T prod = nx * nq, g = grad_rho[i];
    T* gi = grad_qk + i * d;
    T* gq = grad_qk + q * d;
    if (prod >= static_cast<T>(kCosineEps)) {
      const T cos = dot(xi, xq, d) / prod;
      for (int64_t k = 0; k < d; ++k) {
        gi[k] += g * (xq[k] / prod - cos * xi[k] / (nx * nx));
        gq[k] += g * (xi[k] / prod - cos * xq[k] / (nq * nq));
      }
    } else {
      const T eps = static_cast<T>(kCosineEps);
      for (int64_t k = 0; k < d; ++k) {
        gi[k] += g * xq[k] / eps;
        gq[k] += g * xi[k] / eps;
      }
    }
  }
}

template <typename T>
void forward_impl(const ForwardParams& fp) {
  std::vector<Workspace<T>> ws(worker_count(fp.p.pairs(), fp.num_threads));
  parallel_for(fp.p.pairs(), fp.num_threads,
               [&](int64_t pair, int32_t worker) { forward_pair<T>(fp, pair, ws[worker]); });
}

template <typename T>
void backward_impl(const BackwardParams& bp) {
  std::vector<Workspace<T>> ws(worker_count(bp.p.pairs(), bp.num_threads));
  parallel_for(bp.p.pairs(), bp.num_threads,
               [&](int64_t pair, int32_t worker) { backward_pair<T>(bp, pair, ws[worker]); });
}

template <template <typename> class Impl, typename Params>
void by_dtype(const Params& params) {
  switch (params.p.dtype) {
    case DType::kFloat32: return Impl<float>::run(params);
    case DType::kFloat64: return Impl<double>::run(params);
    default: throw std::invalid_argument("bspf CPU kernels support float32 and float64 only");
  }
}

template <typename T> struct MaskOp { static void run(const ForwardParams& q) { mask_impl<T>(q); } };
template <typename T> struct ForwardOp { static void run(const ForwardParams& q) { forward_impl<T>(q); } };
template <typename T> struct BackwardOp { static void run(const BackwardParams& q) { backward_impl<T>(q); } };

}  // namespace

void mask(const ForwardParams& params) { by_dtype<MaskOp>(params); }
void forward(const ForwardParams& params) { by_dtype<ForwardOp>(params); }
void backward(const BackwardParams& params) { by_dtype<BackwardOp>(params); }

void forward_one_pair(const ForwardParams& params, int64_t pair) {
  if (params.p.dtype != DType::kFloat32) throw std::invalid_argument("forward_one_pair: float32 only");
  Workspace<float> workspace;
  forward_pair<float>(params, pair, workspace);
}

void backward_one_pair(const BackwardParams& params, int64_t pair) {
  if (params.p.dtype != DType::kFloat32) throw std::invalid_argument("backward_one_pair: float32 only");
  Workspace<float> workspace;
  backward_pair<float>(params, pair, workspace);
}

}  // namespace bspf::cpu::scalar
