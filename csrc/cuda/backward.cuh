// The backward (SPEC §4) in two deterministic kernels, no atomics:
//
// 1. row_stats_kernel, one CTA per (chunk m, (b, h)) as in the forward: per row
//    δ_i = Σ_k A(i,k)·dA(i,k), then s_i = Σ_k P(i,k)·dP(i,k) and dρ_i. Both need the
//    rows of the chunk together (R and dP mix a row with its match, same chunk).
// 2. gradients_kernel, one CTA per (chunk n, (b, h)) that owns the tokens j of chunk n
//    and sweeps every row tile i: with the row statistics, each entry of dL, and each
//    share of A that reaches V, is a local expression of (i, j). dX_j collects
//    scale·(dL(i,j) + dL(j,i))·x_i (L is symmetric), dV_j collects A(i,j)·g_i written by
//    source (the kept part on g_i, the fused part on g_b(i)), and finally the cosine
//    terms of ρ. Each CTA writes only its own rows: no races.
//
// P, R and dA are recomputed from X, V and dOut rather than stored.
#pragma once

#include "common.cuh"
#include "launch.cuh"
#include "strip.cuh"

namespace bspf::cuda {

// Offsets of δ, s and dρ inside the (3, B, H, N) row statistics.
enum RowStat : int64_t { kDelta = 0, kDotP = 1, kGradRho = 2 };

struct RowStatsLayout {
  size_t words, sa, sb, probs, weights, grads, rho, lse, z, delta, dot_p, grad_rho, match, bytes;
  template <typename A>
  __host__ __device__ static RowStatsLayout make(int32_t omega, int32_t chunks) {
    SmemPlan plan;
    RowStatsLayout l{};
    l.words = plan.take(static_cast<size_t>(omega) * chunks, sizeof(uint64_t));
    l.sa = plan.take(kDepth * kTilePad, sizeof(A));
    l.sb = plan.take(kDepth * kTilePad, sizeof(A));
    l.probs = plan.take(static_cast<size_t>(omega) * kTile, sizeof(A));
    l.weights = plan.take(static_cast<size_t>(omega) * kTile, sizeof(A));
    l.grads = plan.take(static_cast<size_t>(omega) * kTile, sizeof(A));
    l.rho = plan.take(omega, sizeof(A));
    l.lse = plan.take(omega, sizeof(A));
    l.z = plan.take(omega, sizeof(A));
    l.delta = plan.take(omega, sizeof(A));
    l.dot_p = plan.take(omega, sizeof(A));
    l.grad_rho = plan.take(omega, sizeof(A));
    l.match = plan.take(omega, sizeof(int32_t));
    l.bytes = plan.bytes;
    return l;
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(BackwardParams bp, void* row_stats) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const Chunks ch(bp.p.seqlen, bp.p.block_size);
  const RowStatsLayout lay = RowStatsLayout::make<A>(ch.omega, ch.count);
  uint64_t* words = reinterpret_cast<uint64_t*>(smem + lay.words);
  A* sa = reinterpret_cast<A*>(smem + lay.sa);
  A* sb = reinterpret_cast<A*>(smem + lay.sb);
  A* probs = reinterpret_cast<A*>(smem + lay.probs);
  A* weights = reinterpret_cast<A*>(smem + lay.weights);  // R in sweep 1, dR in sweep 2
  A* grads = reinterpret_cast<A*>(smem + lay.grads);      // dA = G Vᵀ
  A* rho = reinterpret_cast<A*>(smem + lay.rho);
  A* lse = reinterpret_cast<A*>(smem + lay.lse);
  A* z = reinterpret_cast<A*>(smem + lay.z);
  A* delta = reinterpret_cast<A*>(smem + lay.delta);
  A* dot_p = reinterpret_cast<A*>(smem + lay.dot_p);
  A* grad_rho = reinterpret_cast<A*>(smem + lay.grad_rho);
  int32_t* match = reinterpret_cast<int32_t*>(smem + lay.match);

  const int64_t n_tok = ch.n, C = ch.count, D = bp.p.head_dim, Dv = bp.p.value_dim;
  const int32_t m = blockIdx.x, span = ch.tile_span();
  const int64_t r0 = ch.begin(m);
  const int32_t rows = ch.size(m);
  const A scale = static_cast<A>(bp.p.scale);
  const bool fuse = bp.p.fuse;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const Strip<A> strip{r0, rows, words, match, rho, lse};
  const int64_t stat_stride = pair_count(bp.p) * n_tok;

  for (int64_t pair = blockIdx.y; pair < pair_count(bp.p); pair += gridDim.y) {
    const Rows<T> x = pair_rows<T>(bp.qk, bp.qk_stride, pair, bp.p.heads);
    const Rows<T> v = pair_rows<T>(bp.v, bp.v_stride, pair, bp.p.heads);
    const Rows<T> g = pair_rows<T>(bp.grad_out, bp.grad_out_stride, pair, bp.p.heads);
    const int64_t row0 = pair * n_tok;
    const A* z_g = static_cast<const A*>(bp.saved.row_sum) + row0;
    A* stats = static_cast<A*>(row_stats) + row0;

    __syncthreads();  // the previous pair is done with shared memory
    load_strip(bp.saved.mask_words + row0 * C, bp.saved.match + row0, static_cast<const A*>(bp.saved.rho) + row0,
               static_cast<const A*>(bp.saved.lse) + row0, ch, r0, rows, words, match, rho, lse);
    for (int i = tid; i < rows; i += kThreads) {
      z[i] = z_g[r0 + i];
      delta[i] = dot_p[i] = grad_rho[i] = A(0);
    }

    // Sweep 1: δ_i = Σ_k R(i,k)·dA(i,k) / Z_i.
    for (int64_t c0 = 0; c0 < n_tok; c0 += span) {
      const int32_t cols = static_cast<int32_t>(n_tok - c0 < span ? n_tok - c0 : span);
      tile_product(x, r0, rows, x, c0, cols, D, scale, sa, sb, probs, kTile);
      tile_product(g, r0, rows, v, c0, cols, Dv, A(1), sa, sb, grads, kTile);
      __syncthreads();
      probs_in_place(probs, strip, cols);
      weights_tile(probs, weights, strip, ch, c0, cols, fuse);
      add_row_dots(weights, grads, rows, cols, delta);
    }
    __syncthreads();
    for (int i = tid; i < rows; i += kThreads) delta[i] /= z[i];

    // Sweep 2: dR on kept entries, dP (kept: dR; pruned and fused: ρ·H·dR of the match's
    // row), then s_i = Σ P·dP and dρ_i = Σ H·P·dR(b(i), ·) over the fused entries.
    for (int64_t c0 = 0; c0 < n_tok; c0 += span) {
      const int32_t cols = static_cast<int32_t>(n_tok - c0 < span ? n_tok - c0 : span);
      tile_product(x, r0, rows, x, c0, cols, D, scale, sa, sb, probs, kTile);
      tile_product(g, r0, rows, v, c0, cols, Dv, A(1), sa, sb, grads, kTile);
      __syncthreads();
      probs_in_place(probs, strip, cols);
      for (int e = tid; e < rows * cols; e += kThreads) {
        const int i = e / cols, j = e % cols;
        weights[i * kTile + j] =
            kept(words + i * C, ch, c0 + j) ? (grads[i * kTile + j] - delta[i]) / z[i] : A(0);
      }
      __syncthreads();
      for (int i = warp; i < rows; i += kWarps) {
        const bool fusing = fuse && fuses(strip, i);
        const int p = match[i];
        A sum_p = A(0), sum_rho = A(0);
        for (int j = lane; j < cols; j += 32) {
          const int64_t column = c0 + j;
          const int64_t c = column / ch.omega;
          const int32_t bit = static_cast<int32_t>(column - c * ch.omega);
          const uint64_t wi = words[i * C + c];
          const A prob = probs[i * kTile + j];
          A grad_prob = A(0);
          if (bit_of(wi, bit)) {
            grad_prob = weights[i * kTile + j];
          } else if (fusing) {
            const uint64_t wp = words[p * C + c];
            if (bit_of(wp, bit)) {
              const A similarity = pattern_similarity<A>(wi, wp, ch.size(c));
              const A grad_target = weights[p * kTile + j];
              grad_prob = rho[i] * similarity * grad_target;
              sum_rho += similarity * prob * grad_target;
            }
          }
          sum_p += prob * grad_prob;
        }
        sum_p = warp_sum(sum_p);
        sum_rho = warp_sum(sum_rho);
        if (lane == 0) {
          dot_p[i] += sum_p;
          grad_rho[i] += sum_rho;
        }
      }
    }
    __syncthreads();
    for (int i = tid; i < rows; i += kThreads) {
      stats[kDelta * stat_stride + r0 + i] = delta[i];
      stats[kDotP * stat_stride + r0 + i] = dot_p[i];
      stats[kGradRho * stat_stride + r0 + i] = grad_rho[i];
    }
  }
}

struct GradientsLayout {
  size_t own_words, sa, sb, logits, grads_ij, grads_ji, staged, own_lse, own_z, own_delta, own_dot_p, own_rho,
      own_grad_rho, row_lse, row_z, row_delta, row_dot_p, row_rho, row_words, own_match, row_match, bytes;
  template <typename A>
  __host__ __device__ static GradientsLayout make(int32_t omega, int32_t chunks) {
    SmemPlan plan;
    GradientsLayout l{};
    l.own_words = plan.take(static_cast<size_t>(omega) * chunks, sizeof(uint64_t));
    l.row_words = plan.take(kTile, sizeof(uint64_t));
    l.sa = plan.take(kDepth * kTilePad, sizeof(A));
    l.sb = plan.take(kDepth * kTilePad, sizeof(A));
    l.logits = plan.take(kTile * kTile, sizeof(A));
    l.grads_ij = plan.take(kTile * kTile, sizeof(A));
    l.grads_ji = plan.take(static_cast<size_t>(omega) * kTile, sizeof(A));
    l.staged = plan.take(kTile * kSlice, sizeof(A));
    l.own_lse = plan.take(omega, sizeof(A));
    l.own_z = plan.take(omega, sizeof(A));
    l.own_delta = plan.take(omega, sizeof(A));
    l.own_dot_p = plan.take(omega, sizeof(A));
    l.own_rho = plan.take(omega, sizeof(A));
    l.own_grad_rho = plan.take(omega, sizeof(A));
    l.row_lse = plan.take(kTile, sizeof(A));
    l.row_z = plan.take(kTile, sizeof(A));
    l.row_delta = plan.take(kTile, sizeof(A));
    l.row_dot_p = plan.take(kTile, sizeof(A));
    l.row_rho = plan.take(kTile, sizeof(A));
    l.own_match = plan.take(omega, sizeof(int32_t));
    l.row_match = plan.take(kTile, sizeof(int32_t));
    l.bytes = plan.bytes;
    return l;
  }
};

// Per-row data of one side (the CTA's own chunk, or the current row tile).
template <typename A>
struct Side {
  const A* lse;
  const A* z;
  const A* delta;
  const A* dot_p;
  const A* rho;
  const int32_t* match;  // tile-local
};

// dR(p, ·) at a kept entry: (dA − δ_p) / Z_p.
template <typename A>
__device__ __forceinline__ A grad_weight(A grad_attn, const Side<A>& s, int p) {
  return (grad_attn - s.delta[p]) / s.z[p];
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gradients_kernel(BackwardParams bp, const void* row_stats, void* grad_qk_acc, void* grad_v_acc) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const Chunks ch(bp.p.seqlen, bp.p.block_size);
  const GradientsLayout lay = GradientsLayout::make<A>(ch.omega, ch.count);
  uint64_t* own_words = reinterpret_cast<uint64_t*>(smem + lay.own_words);
  uint64_t* row_words = reinterpret_cast<uint64_t*>(smem + lay.row_words);  // M[i, chunk n]
  A* sa = reinterpret_cast<A*>(smem + lay.sa);
  A* sb = reinterpret_cast<A*>(smem + lay.sb);
  A* logits = reinterpret_cast<A*>(smem + lay.logits);      // [r][q]; then dX coefficients
  A* grads_ij = reinterpret_cast<A*>(smem + lay.grads_ij);  // [r][q] = g_i·v_j; then dV coefficients
  A* grads_ji = reinterpret_cast<A*>(smem + lay.grads_ji);  // [q][r] = g_j·v_i; then fused dV shares
  A* staged = reinterpret_cast<A*>(smem + lay.staged);
  A* own_lse = reinterpret_cast<A*>(smem + lay.own_lse);
  A* own_z = reinterpret_cast<A*>(smem + lay.own_z);
  A* own_delta = reinterpret_cast<A*>(smem + lay.own_delta);
  A* own_dot_p = reinterpret_cast<A*>(smem + lay.own_dot_p);
  A* own_rho = reinterpret_cast<A*>(smem + lay.own_rho);
  A* own_grad_rho = reinterpret_cast<A*>(smem + lay.own_grad_rho);
  A* row_lse = reinterpret_cast<A*>(smem + lay.row_lse);
  A* row_z = reinterpret_cast<A*>(smem + lay.row_z);
  A* row_delta = reinterpret_cast<A*>(smem + lay.row_delta);
  A* row_dot_p = reinterpret_cast<A*>(smem + lay.row_dot_p);
  A* row_rho = reinterpret_cast<A*>(smem + lay.row_rho);
  int32_t* own_match = reinterpret_cast<int32_t*>(smem + lay.own_match);
  int32_t* row_match = reinterpret_cast<int32_t*>(smem + lay.row_match);
  const Side<A> own{own_lse, own_z, own_delta, own_dot_p, own_rho, own_match};
  const Side<A> row{row_lse, row_z, row_delta, row_dot_p, row_rho, row_match};

  const int64_t n_tok = ch.n, C = ch.count, D = bp.p.head_dim, Dv = bp.p.value_dim;
  const int32_t n = blockIdx.x, span = ch.tile_span();
  const int64_t j0 = ch.begin(n);
  const int32_t cols = ch.size(n);
  const A scale = static_cast<A>(bp.p.scale);
  const A eps = static_cast<A>(kCosEps);
  const bool fuse = bp.p.fuse;
  const int tid = threadIdx.x;
  const int64_t stat_stride = pair_count(bp.p) * n_tok;

  for (int64_t pair = blockIdx.y; pair < pair_count(bp.p); pair += gridDim.y) {
    const Rows<T> x = pair_rows<T>(bp.qk, bp.qk_stride, pair, bp.p.heads);
    const Rows<T> v = pair_rows<T>(bp.v, bp.v_stride, pair, bp.p.heads);
    const Rows<T> g = pair_rows<T>(bp.grad_out, bp.grad_out_stride, pair, bp.p.heads);
    const int64_t row0 = pair * n_tok;
    const uint64_t* words_g = bp.saved.mask_words + row0 * C;
    const int32_t* match_g = bp.saved.match + row0;
    const A* rho_g = static_cast<const A*>(bp.saved.rho) + row0;
    const A* lse_g = static_cast<const A*>(bp.saved.lse) + row0;
    const A* z_g = static_cast<const A*>(bp.saved.row_sum) + row0;
    const A* stats = static_cast<const A*>(row_stats) + row0;
    A* grad_x = static_cast<A*>(grad_qk_acc) + row0 * D;
    A* grad_v = static_cast<A*>(grad_v_acc) + row0 * Dv;

    __syncthreads();  // the previous pair is done with shared memory
    for (int64_t e = tid; e < cols * C; e += kThreads) own_words[e] = words_g[j0 * C + e];
    for (int q = tid; q < cols; q += kThreads) {
      const int64_t j = j0 + q;
      own_lse[q] = lse_g[j];
      own_z[q] = z_g[j];
      own_rho[q] = rho_g[j];
      own_delta[q] = stats[kDelta * stat_stride + j];
      own_dot_p[q] = stats[kDotP * stat_stride + j];
      own_grad_rho[q] = stats[kGradRho * stat_stride + j];
      own_match[q] = static_cast<int32_t>(match_g[j] - j0);
    }

    for (int64_t i0 = 0; i0 < n_tok; i0 += span) {
      const int32_t ti = static_cast<int32_t>(n_tok - i0 < span ? n_tok - i0 : span);
      __syncthreads();  // the previous tile is done with the row data
      for (int r = tid; r < ti; r += kThreads) {
        const int64_t i = i0 + r;
        row_lse[r] = lse_g[i];
        row_z[r] = z_g[i];
        row_rho[r] = rho_g[i];
        row_delta[r] = stats[kDelta * stat_stride + i];
        row_dot_p[r] = stats[kDotP * stat_stride + i];
        row_match[r] = static_cast<int32_t>(match_g[i] - i0);
        row_words[r] = words_g[i * C + n];
      }
      tile_product(x, i0, ti, x, j0, cols, D, scale, sa, sb, logits, kTile);
      tile_product(g, i0, ti, v, j0, cols, Dv, A(1), sa, sb, grads_ij, kTile);
      tile_product(g, j0, cols, v, i0, ti, Dv, A(1), sa, sb, grads_ji, kTile);
      __syncthreads();

      // Every entry pair (i, j), (j, i) of the tile: dX and dV coefficients.
      A kept_share[kPerThread], fused_share[kPerThread];
#pragma unroll
      for (int t = 0; t < kPerThread; ++t) {
        const int e = tid + t * kThreads;
        const int r = e / kTile, q = e % kTile;
        kept_share[t] = fused_share[t] = A(0);
        if (r >= ti || q >= cols) continue;
        const int64_t i = i0 + r;
        const A logit = logits[r * kTile + q];

        // Entry (i, j): row i of the tile, column j of chunk n (bit q of M[i, chunk n]).
        const A prob_ij = exp_acc(logit - row.lse[r]);
        const uint64_t wi = row_words[r];
        const int br = row.match[r];
        A grad_prob_ij = A(0);
        if (bit_of(wi, q)) {
          grad_prob_ij = grad_weight(grads_ij[r * kTile + q], row, r);
          kept_share[t] = prob_ij / row.z[r];
        } else if (fuse && br != r && row.rho[r] > A(0) && bit_of(row_words[br], q)) {
          const A alpha = row.rho[r] * pattern_similarity<A>(wi, row_words[br], cols);
          grad_prob_ij = alpha * grad_weight(grads_ij[br * kTile + q], row, br);
          fused_share[t] = alpha * prob_ij / row.z[br];
        }
        const A grad_logit_ij = prob_ij * (grad_prob_ij - row.dot_p[r]);

        // Entry (j, i): row j of chunk n, column i of chunk ci.
        const int64_t ci = i / ch.omega;
        const int32_t bit = static_cast<int32_t>(i - ci * ch.omega);
        const A prob_ji = exp_acc(logit - own.lse[q]);
        const uint64_t wj = own_words[q * C + ci];
        const int bq = own.match[q];
        A grad_prob_ji = A(0);
        if (bit_of(wj, bit)) {
          grad_prob_ji = grad_weight(grads_ji[q * kTile + r], own, q);
        } else if (fuse && bq != q && own.rho[q] > A(0) && bit_of(own_words[bq * C + ci], bit)) {
          const A alpha = own.rho[q] * pattern_similarity<A>(wj, own_words[bq * C + ci], ch.size(ci));
          grad_prob_ji = alpha * grad_weight(grads_ji[bq * kTile + r], own, bq);
        }
        const A grad_logit_ji = prob_ji * (grad_prob_ji - own.dot_p[q]);

        // Only this thread reads logits[r][q]: overwrite it with the dX coefficient.
        logits[r * kTile + q] = scale * (grad_logit_ij + grad_logit_ji);
      }
      __syncthreads();
#pragma unroll
      for (int t = 0; t < kPerThread; ++t) {
        const int e = tid + t * kThreads;
        const int r = e / kTile, q = e % kTile;
        if (r < ti && q < cols) {
          grads_ij[r * kTile + q] = kept_share[t];
          grads_ji[q * kTile + r] = fused_share[t];
        }
      }
      __syncthreads();
      // A fused share of row i reaches V through row b(i): one thread per column adds
      // them in row order (deterministic).
      if (fuse)
        for (int q = tid; q < cols; q += kThreads)
          for (int r = 0; r < ti; ++r) {
            const A share = grads_ji[q * kTile + r];
            if (share != A(0)) grads_ij[row.match[r] * kTile + q] += share;
          }

      // dX_j += Σ_i coefficient(i, j) x_i and dV_j += Σ_i share(i, j) g_i, kSlice features
      // at a time, into the caller's zeroed accumulators (this CTA owns rows j).
      for (int pass = 0; pass < 2; ++pass) {
        const Rows<T> src = pass == 0 ? x : g;
        const A* coefficient = pass == 0 ? logits : grads_ij;
        const int64_t width = pass == 0 ? D : Dv;
        A* dst = pass == 0 ? grad_x : grad_v;
        for (int64_t f0 = 0; f0 < width; f0 += kSlice) {
          __syncthreads();  // coefficients complete; the previous slice is consumed
          for (int e = tid; e < kTile * kSlice; e += kThreads) {
            const int r = e / kSlice, f = e % kSlice;
            staged[e] = (r < ti && f0 + f < width) ? to_acc(src(i0 + r, f0 + f)) : A(0);
          }
          __syncthreads();
          for (int e = tid; e < cols * kSlice; e += kThreads) {
            const int q = e / kSlice, f = e % kSlice;
            if (f0 + f >= width) continue;
            A sum = A(0);
            for (int r = 0; r < ti; ++r) sum = fma_acc(coefficient[r * kTile + q], staged[r * kSlice + f], sum);
            dst[(j0 + q) * width + f0 + f] += sum;
          }
        }
      }
    }

    // The cosine behind ρ (SPEC §4, last line): j receives the term of its own ρ_j (as x_i)
    // and of every ρ_i whose match is j (as x_b(i)), in increasing i as on the CPU.
    if (fuse) {
      A* gram = grads_ij;
      tile_product(x, j0, cols, x, j0, cols, D, A(1), sa, sb, gram, kTile);
      __syncthreads();
      for (int64_t e = tid; e < cols * D; e += kThreads) {
        const int q = static_cast<int>(e / D);
        const int64_t f = e % D;
        const A xq = to_acc(x(j0 + q, f));
        A sum = A(0);
        for (int i = 0; i < cols; ++i) {
          const int target = own.match[i];
          if (target == i || !(own.rho[i] > A(0)) || own_grad_rho[i] == A(0)) continue;
          if (i != q && target != q) continue;
          const A grad = own_grad_rho[i];
          const A norm_i = sqrt_acc(gram[i * kTile + i]), norm_t = sqrt_acc(gram[target * kTile + target]);
          const A prod = norm_i * norm_t;
          // i == q: the derivative in x_i, partner x_target; else q is the target, partner x_i.
          const int partner = i == q ? target : i;
          const A norm_q = i == q ? norm_i : norm_t;
          const A x_partner = to_acc(x(j0 + partner, f));
          if (prod >= eps) {
            const A cos = gram[i * kTile + target] / prod;
            sum += grad * (x_partner / prod - cos * xq / (norm_q * norm_q));
          } else {
            sum += grad * x_partner / eps;
          }
        }
        grad_x[(j0 + q) * D + f] += sum;
      }
    }
  }
}

// grad (input dtype) = the accumulator (accumulation type), when they are not the same buffer.
template <typename T>
__global__ void __launch_bounds__(256) cast_kernel(const acc_t<T>* src, T* dst, int64_t count) {
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < count; e += int64_t{gridDim.x} * blockDim.x)
    dst[e] = from_acc<T>(src[e]);
}

template <typename T>
size_t backward_shared_bytes(const Problem& p, size_t) {
  using A = acc_t<T>;
  const Chunks ch(p.seqlen, p.block_size);
  return std::max(RowStatsLayout::make<A>(ch.omega, ch.count).bytes, GradientsLayout::make<A>(ch.omega, ch.count).bytes);
}

template <typename T>
void launch_backward(const BackwardParams& params, const BackwardWorkspace& workspace, size_t, cudaStream_t stream) {
  using A = acc_t<T>;
  const Chunks ch(params.p.seqlen, params.p.block_size);
  const dim3 grid = grid_for(ch.count, params.p.pairs());
  launch_kernel(row_stats_kernel<T>, grid, kThreads, RowStatsLayout::make<A>(ch.omega, ch.count).bytes, stream,
                "launching the backward row-statistics kernel", params, workspace.row_stats);
  launch_kernel(gradients_kernel<T>, grid, kThreads, GradientsLayout::make<A>(ch.omega, ch.count).bytes, stream,
                "launching the backward gradients kernel", params, static_cast<const void*>(workspace.row_stats),
                workspace.grad_qk_acc, workspace.grad_v_acc);
  const int64_t rows = params.p.pairs() * params.p.seqlen;
  const struct {
    const void* acc;
    void* out;
    int64_t count;
  } casts[2] = {{workspace.grad_qk_acc, params.grad_qk, rows * params.p.head_dim},
                {workspace.grad_v_acc, params.grad_v, rows * params.p.value_dim}};
  for (const auto& c : casts) {
    if (c.acc == c.out || c.count == 0) continue;
    const int64_t blocks = std::min<int64_t>((c.count + 255) / 256, 65535);
    launch_kernel(cast_kernel<T>, dim3(static_cast<unsigned>(blocks)), 256, 0, stream,
                  "launching the gradient cast kernel", static_cast<const A*>(c.acc), static_cast<T*>(c.out),
                  c.count);
  }
}

}  // namespace bspf::cuda
