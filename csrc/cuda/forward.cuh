// The fused forward (SPEC §3.4–3.9): one CTA per (chunk m, (b, h)) after the mask
// kernel. The CTA owns the rows of chunk m: it matches them (cosine within the chunk),
// takes full-row softmax statistics over column tiles (online max/sum), then, tile by
// tile, recomputes the logits, builds R = P ⊙ M + F (every fusion source and target is a
// row of the same chunk) and accumulates R·V and Z. Logits are recomputed rather than
// stored, so any N whose mask words fit in shared memory works.
#pragma once

#include "common.cuh"
#include "launch.cuh"
#include "mask.cuh"
#include "strip.cuh"

namespace bspf::cuda {

struct ForwardLayout {
  size_t words, sa, sb, probs, weights, values, lse, rho, z, run_max, run_sum, match, bytes;
  template <typename A>
  __host__ __device__ static ForwardLayout make(int32_t omega, int32_t chunks) {
    SmemPlan plan;
    ForwardLayout l{};
    l.words = plan.take(static_cast<size_t>(omega) * chunks, sizeof(uint64_t));
    l.sa = plan.take(kDepth * kTilePad, sizeof(A));
    l.sb = plan.take(kDepth * kTilePad, sizeof(A));
    l.probs = plan.take(static_cast<size_t>(omega) * kTile, sizeof(A));
    l.weights = plan.take(static_cast<size_t>(omega) * kTile, sizeof(A));
    l.values = plan.take(kTile * kTile, sizeof(A));
    l.lse = plan.take(omega, sizeof(A));
    l.rho = plan.take(omega, sizeof(A));
    l.z = plan.take(omega, sizeof(A));
    l.run_max = plan.take(omega, sizeof(A));
    l.run_sum = plan.take(omega, sizeof(A));
    l.match = plan.take(omega, sizeof(int32_t));
    l.bytes = plan.bytes;
    return l;
  }
};

// b(i) and ρ_i for the rows of a chunk from their Gram matrix G (pitch kTile), exactly as
// the CPU path: the first candidate is taken, a later one only if strictly better.
template <typename A>
__device__ void match_rows(const A* gram, int64_t r0, int32_t rows, int32_t* match, A* rho, int32_t* match_g,
                           A* rho_g) {
  const A eps = static_cast<A>(kCosEps);
  for (int i = threadIdx.x; i < rows; i += kThreads) {
    const A norm_i = sqrt_acc(gram[i * kTile + i]);
    int best = i;
    A best_cos = neg_inf<A>();
    for (int j = 0; j < rows; ++j) {
      if (j == i) continue;
      const A prod = norm_i * sqrt_acc(gram[j * kTile + j]);
      const A cos = gram[i * kTile + j] / (prod < eps ? eps : prod);
      if (best == i || cos > best_cos) {
        best = j;
        best_cos = cos;
      }
    }
    const A r = best == i ? A(0) : (best_cos < A(0) ? A(0) : best_cos);
    match[i] = best;
    rho[i] = r;
    match_g[r0 + i] = static_cast<int32_t>(r0 + best);
    rho_g[r0 + i] = r;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(ForwardParams fp) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const Chunks ch(fp.p.seqlen, fp.p.block_size);
  const ForwardLayout lay = ForwardLayout::make<A>(ch.omega, ch.count);
  uint64_t* words = reinterpret_cast<uint64_t*>(smem + lay.words);
  A* sa = reinterpret_cast<A*>(smem + lay.sa);
  A* sb = reinterpret_cast<A*>(smem + lay.sb);
  A* probs = reinterpret_cast<A*>(smem + lay.probs);
  A* weights = reinterpret_cast<A*>(smem + lay.weights);
  A* values = reinterpret_cast<A*>(smem + lay.values);
  A* lse = reinterpret_cast<A*>(smem + lay.lse);
  A* rho = reinterpret_cast<A*>(smem + lay.rho);
  A* z = reinterpret_cast<A*>(smem + lay.z);
  A* run_max = reinterpret_cast<A*>(smem + lay.run_max);
  A* run_sum = reinterpret_cast<A*>(smem + lay.run_sum);
  int32_t* match = reinterpret_cast<int32_t*>(smem + lay.match);

  const int64_t n_tok = ch.n, C = ch.count, D = fp.p.head_dim, Dv = fp.p.value_dim;
  const int32_t m = blockIdx.x, span = ch.tile_span();
  const int64_t r0 = ch.begin(m);
  const int32_t rows = ch.size(m);
  const A scale = static_cast<A>(fp.p.scale);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const Strip<A> strip{r0, rows, words, match, rho, lse};

  for (int64_t pair = blockIdx.y; pair < pair_count(fp.p); pair += gridDim.y) {
    const Rows<T> x = pair_rows<T>(fp.qk, fp.qk_stride, pair, fp.p.heads);
    const Rows<T> v = pair_rows<T>(fp.v, fp.v_stride, pair, fp.p.heads);
    const uint64_t* words_g = fp.saved.mask_words + pair * n_tok * C;
    int32_t* match_g = fp.saved.match + pair * n_tok;
    A* rho_g = static_cast<A*>(fp.saved.rho) + pair * n_tok;
    A* lse_g = static_cast<A*>(fp.saved.lse) + pair * n_tok;
    A* z_g = static_cast<A*>(fp.saved.row_sum) + pair * n_tok;
    T* out = static_cast<T*>(fp.out) + pair * n_tok * Dv;

    __syncthreads();  // the previous pair is done with shared memory
    for (int64_t e = tid; e < rows * C; e += kThreads) words[e] = words_g[r0 * C + e];
    for (int i = tid; i < rows; i += kThreads) {
      run_max[i] = neg_inf<A>();
      run_sum[i] = A(0);
      z[i] = A(0);
    }

    // Matching (SPEC §3.5) from the chunk's Gram matrix.
    tile_product(x, r0, rows, x, r0, rows, D, A(1), sa, sb, probs, kTile);
    __syncthreads();
    match_rows(probs, r0, rows, match, rho, match_g, rho_g);

    // Pass 1: log-sum-exp of every full logit row, online over column tiles.
    for (int64_t c0 = 0; c0 < n_tok; c0 += span) {
      const int32_t cols = static_cast<int32_t>(n_tok - c0 < span ? n_tok - c0 : span);
      tile_product(x, r0, rows, x, c0, cols, D, scale, sa, sb, probs, kTile);
      __syncthreads();
      for (int i = warp; i < rows; i += kWarps) {
        A tile_max = neg_inf<A>();
        for (int j = lane; j < cols; j += 32) tile_max = fmax(tile_max, probs[i * kTile + j]);
        tile_max = warp_max(tile_max);
        const A old_max = run_max[i], old_sum = run_sum[i];
        const A new_max = fmax(old_max, tile_max);
        A part = A(0);
        if (new_max != neg_inf<A>())
          for (int j = lane; j < cols; j += 32) part += exp_acc(probs[i * kTile + j] - new_max);
        part = warp_sum(part);
        if (lane == 0) {
          run_sum[i] = new_max == neg_inf<A>() ? A(0) : old_sum * exp_acc(old_max - new_max) + part;
          run_max[i] = new_max;
        }
      }
    }
    __syncthreads();
    for (int i = tid; i < rows; i += kThreads) {
      lse[i] = run_max[i] + log_acc(run_sum[i]);
      lse_g[r0 + i] = lse[i];
    }

    // Pass 2: R tile by tile, Z and R·V, one slice of kTile value columns at a time.
    const int64_t slices = Dv > 0 ? (Dv + kTile - 1) / kTile : 1;
    for (int64_t slice = 0; slice < slices; ++slice) {
      const int64_t d0 = slice * kTile;
      A acc[kPerThread];
#pragma unroll
      for (int t = 0; t < kPerThread; ++t) acc[t] = A(0);
      for (int64_t c0 = 0; c0 < n_tok; c0 += span) {
        const int32_t cols = static_cast<int32_t>(n_tok - c0 < span ? n_tok - c0 : span);
        tile_product(x, r0, rows, x, c0, cols, D, scale, sa, sb, probs, kTile);
        __syncthreads();
        probs_in_place(probs, strip, cols);
        weights_tile(probs, weights, strip, ch, c0, cols, fp.p.fuse);
        for (int e = tid; e < kTile * kTile; e += kThreads) {
          const int j = e / kTile, d = e % kTile;
          values[e] = (j < cols && d0 + d < Dv) ? to_acc(v(c0 + j, d0 + d)) : A(0);
        }
        if (slice == 0) add_row_dots<A>(weights, nullptr, rows, cols, z);
        __syncthreads();
#pragma unroll
        for (int t = 0; t < kPerThread; ++t) {
          const int e = tid + t * kThreads;
          const int i = e / kTile, d = e % kTile;
          if (i < rows) {  // warp-uniform
            A a = acc[t];
            for (int j = 0; j < cols; ++j) a = fma_acc(weights[i * kTile + j], values[j * kTile + d], a);
            acc[t] = a;
          }
        }
      }
      __syncthreads();  // Z is complete
#pragma unroll
      for (int t = 0; t < kPerThread; ++t) {
        const int e = tid + t * kThreads;
        const int i = e / kTile, d = e % kTile;
        if (i < rows && d0 + d < Dv) out[(r0 + i) * Dv + d0 + d] = from_acc<T>(acc[t] / z[i]);
      }
      if (slice == 0)
        for (int i = tid; i < rows; i += kThreads) z_g[r0 + i] = z[i];
    }
  }
}

template <typename T>
size_t forward_shared_bytes(const Problem& p, size_t) {
  using A = acc_t<T>;
  const Chunks ch(p.seqlen, p.block_size);
  return std::max(MaskLayout::make<A>(ch.omega).bytes, ForwardLayout::make<A>(ch.omega, ch.count).bytes);
}

template <typename T>
void launch_mask(const ForwardParams& params, size_t, cudaStream_t stream) {
  using A = acc_t<T>;
  const Chunks ch(params.p.seqlen, params.p.block_size);
  const int64_t C = ch.count;
  const int64_t keep_full = keep_count(params.keep_ratio, ch.omega, ch.omega);
  const int64_t keep_last = keep_count(params.keep_ratio, ch.omega, ch.size(C - 1));
  launch_kernel(mask_kernel<T>, grid_for(C * C, params.p.pairs()), kThreads, MaskLayout::make<A>(ch.omega).bytes,
                stream, "launching the mask kernel", params, keep_full, keep_last);
}

template <typename T>
void launch_forward(const ForwardParams& params, size_t limit, cudaStream_t stream) {
  using A = acc_t<T>;
  launch_mask<T>(params, limit, stream);
  const Chunks ch(params.p.seqlen, params.p.block_size);
  launch_kernel(forward_kernel<T>, grid_for(ch.count, params.p.pairs()), kThreads,
                ForwardLayout::make<A>(ch.omega, ch.count).bytes, stream, "launching the forward kernel", params);
}

}  // namespace bspf::cuda
