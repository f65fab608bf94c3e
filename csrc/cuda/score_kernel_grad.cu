// The surrogate gradient of the 3×3 score kernel W (docs/spec.md §4a) on CUDA: the entry
// point, its two kernels and their launch. No atomics: one CTA per (batch, head) pair
// writes the pair's share of dW, then one CTA adds the shares in pair order, so the result
// is the same on every run.
//
// A pair's CTA sweeps its logits in Ω×Ω tiles (L and dA recomputed by tile_product, as the
// backward does) twice: first for δ_p = Σ_k A(p, k)·dA(p, k) of every row, then, per upper
// block with a choice, G = ∂loss/∂M on the block and on its mirror, the block's scores S,
// τ_b, T_b, dS and the block's dW terms, which each thread sums in double. Every ratio of
// probabilities is one exponent of the saved lse and log Z, as on the CPU
// (csrc/cpu/score_kernel_grad.cpp, the same steps in the same order per entry).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bspf/cuda.h"
#include "bspf/validate.h"
#include "common.cuh"
#include "launch.cuh"
#include "selection.cuh"  // order_key

namespace bspf::cuda {
namespace {

// exp of a log-ratio of probabilities, bounded below the type's overflow (log(max) − 8),
// reached only at extreme logits; a NaN stays NaN.
__device__ __forceinline__ float bounded_exp(float x) { return expf(x > 80.72283935546875f ? 80.72283935546875f : x); }
__device__ __forceinline__ double bounded_exp(double x) { return exp(x > 701.782712893384 ? 701.782712893384 : x); }

// The score whose order_key is `key` (its inverse; −0 and NaN come back as +0 and −inf).
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}
__device__ __forceinline__ double key_value(unsigned long long key) {
  return __longlong_as_double(static_cast<long long>((key >> 63) ? (key & ~(1ull << 63)) : ~key));
}

// Shared memory of the pair kernel: staging for tile_product, four Ω×Ω tiles (pitch Ω),
// δ of every row, and reduction scratch. Host and device compute the same offsets.
struct Layout {
  size_t stage_a, stage_b, logits, grads, lower, upper, delta, sums, counts, bytes;
  template <typename A>
  __host__ __device__ static Layout of(int32_t omega, int64_t n) {
    SmemPlan plan;
    Layout l;
    const size_t tile = static_cast<size_t>(omega) * omega;
    l.stage_a = plan.take(kDepth * kTilePad, sizeof(A));
    l.stage_b = plan.take(kDepth * kTilePad, sizeof(A));
    l.logits = plan.take(tile, sizeof(A));
    l.grads = plan.take(tile, sizeof(A));
    l.lower = plan.take(tile, sizeof(A));
    l.upper = plan.take(tile, sizeof(A));
    l.delta = plan.take(static_cast<size_t>(n), sizeof(A));
    l.sums = plan.take(9 * kWarps, sizeof(double));
    l.counts = plan.take(kWarps, sizeof(int));
    l.bytes = plan.bytes;
    return l;
  }
};

// One pair's inputs and the CTA's shared buffers.
template <typename T>
struct Pair {
  using A = acc_t<T>;
  Rows<T> x, v, g;
  const uint64_t* words;
  const int32_t* match;
  const A *rho, *lse, *log_z;
  Chunks ch;
  int64_t depth, value_depth;
  A scale;
  bool fuse;
  A *stage_a, *stage_b, *logits, *grads, *delta;

  __device__ bool kept(int64_t i, int64_t j) const { return bit_of(words[i * ch.count + j / ch.omega], j % ch.omega); }
  // α(i, j) = ρ_i · H_{i, n(j)} for j in chunk c; 0 for a token alone in its chunk.
  __device__ A alpha(int64_t i, int64_t c) const {
    const int64_t p = match[i];
    if (p == i) return A(0);
    const uint64_t differ = words[i * ch.count + c] ^ words[p * ch.count + c];
    return rho[i] * (A(1) - static_cast<A>(__popcll(differ)) / static_cast<A>(ch.size(c)));
  }
  // log P(i, j) − log Z_t for entry (i, j) of the tile of rows chunk r.
  __device__ A log_ratio(int64_t r0, int i, int j, int64_t t) const {
    const int64_t p = r0 + i;
    return at_most_zero(logits[i * ch.omega + j] - lse[p]) - log_z[t];
  }

  // L and dA on rows of chunk r × columns of chunk q into logits and grads (pitch Ω).
  __device__ void load_tile(int64_t r, int64_t q) const {
    const int32_t nr = ch.size(r), nq = ch.size(q);
    tile_product(x, ch.begin(r), nr, x, ch.begin(q), nq, depth, scale, stage_a, stage_b, logits, ch.omega);
    tile_product(g, ch.begin(r), nr, v, ch.begin(q), nq, value_depth, A(1), stage_a, stage_b, grads, ch.omega);
    __syncthreads();
  }

  // out = (P + [fuse]·Φ) / Z on the loaded tile: what keeping (p, j) adds to row p.
  __device__ void gain(int64_t r, int64_t q, A* out) const {
    const int32_t nr = ch.size(r), nq = ch.size(q);
    const int64_t r0 = ch.begin(r), q0 = ch.begin(q);
    for (int e = threadIdx.x; e < nr * nq; e += kThreads) {
      const int i = e / nq, j = e % nq;
      out[i * ch.omega + j] = bounded_exp(log_ratio(r0, i, j, r0 + i));
    }
    __syncthreads();
    if (fuse && r != q) {
      // One thread per column: the rows matched to p add their pruned shares to (p, j).
      for (int j = threadIdx.x; j < nq; j += kThreads)
        for (int i = 0; i < nr; ++i) {
          const int64_t p = r0 + i, t = match[p];
          if (kept(p, q0 + j)) continue;
          const A a = alpha(p, q);
          if (a == A(0)) continue;
          out[(t - r0) * ch.omega + j] += a * bounded_exp(log_ratio(r0, i, j, t));
        }
    }
    __syncthreads();
  }

  // δ_p += Σ_j M(p, j)·gain(p, j)·dA(p, j) over the tile's columns; a warp per row, in order.
  __device__ void add_row_sums(int64_t r, int64_t q, const A* tile_gain) const {
    const int32_t nr = ch.size(r), nq = ch.size(q);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = warp; i < nr; i += kWarps) {
      A s = A(0);
      for (int j = lane; j < nq; j += 32)
        if (kept(ch.begin(r) + i, ch.begin(q) + j)) s += tile_gain[i * ch.omega + j] * grads[i * ch.omega + j];
      s = warp_sum(s);
      if (lane == 0) delta[ch.begin(r) + i] += s;
    }
    __syncthreads();
  }

  // out: gain → G(p, j) = ∂loss/∂M(p, j) in place (each entry reads only its own gain):
  // Z_p·dR(p, j)·gain, less, when fused, the share row p then no longer gives to b(p).
  __device__ void mask_gradient(int64_t r, int64_t q, A* out) const {
    const int32_t nr = ch.size(r), nq = ch.size(q);
    const int64_t r0 = ch.begin(r), q0 = ch.begin(q);
    for (int e = threadIdx.x; e < nr * nq; e += kThreads) {
      const int i = e / nq, j = e % nq;
      const int64_t p = r0 + i;
      A grad = out[i * ch.omega + j] * (grads[i * ch.omega + j] - delta[p]);
      if (fuse) {
        const int64_t t = match[p];
        const A a = alpha(p, q);
        if (a != A(0) && kept(t, q0 + j))
          grad -= a * bounded_exp(log_ratio(r0, i, j, t)) * (grads[(t - r0) * ch.omega + j] - delta[t]);
      }
      out[i * ch.omega + j] = grad;
    }
    __syncthreads();
  }
};

// Sum over the CTA, returned to every thread; fixed order (deterministic).
__device__ double cta_sum(double v, double* scratch) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  double total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// The k-th and (k+1)-th largest of the block's scores (pitch Ω), by bisection on their
// order keys; both counts (< 2^12 each) travel in one int.
template <typename A>
__device__ void kth_and_next(const A* scores, int32_t rows, int32_t cols, int32_t pitch, int64_t k, int* counts,
                             A& kth, A& next) {
  using Key = typename KeyOf<A>::type;
  Key t1 = 0, t2 = 0;
  for (int bit = 8 * static_cast<int>(sizeof(Key)) - 1; bit >= 0; --bit) {
    const Key c1 = t1 | (Key{1} << bit), c2 = t2 | (Key{1} << bit);
    int both = 0;
    for (int e = threadIdx.x; e < rows * cols; e += kThreads) {
      const Key key = order_key(scores[(e / cols) * pitch + e % cols]);
      both += (key >= c1) + ((key >= c2) << 16);
    }
    both = block_sum(both, counts);
    if ((both & 0xffff) >= k) t1 = c1;
    if ((both >> 16) >= k + 1) t2 = c2;
  }
  kth = key_value(t1);
  next = key_value(t2);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pair_kernel(ScoreKernelGradParams sp, int64_t keep_full, int64_t keep_last,
                                                          double* partials) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const Chunks ch(sp.p.seqlen, sp.p.block_size);
  const int64_t n = ch.n;
  const Layout layout = Layout::of<A>(ch.omega, n);
  A* lower = reinterpret_cast<A*>(smem + layout.lower);
  A* upper = reinterpret_cast<A*>(smem + layout.upper);
  double* sums = reinterpret_cast<double*>(smem + layout.sums);
  int* counts = reinterpret_cast<int*>(smem + layout.counts);
  A w[9];
#pragma unroll
  for (int t = 0; t < 9; ++t) w[t] = static_cast<const A*>(sp.score_kernel)[t];

  for (int64_t pair = blockIdx.y; pair < pair_count(sp.p); pair += gridDim.y) {
    const int64_t row0 = pair * n;
    Pair<T> P{pair_rows<T>(sp.qk, sp.qk_stride, pair, sp.p.heads),
              pair_rows<T>(sp.v, sp.v_stride, pair, sp.p.heads),
              pair_rows<T>(sp.grad_out, sp.grad_out_stride, pair, sp.p.heads),
              sp.saved.mask_words + row0 * ch.count,
              sp.saved.match + row0,
              static_cast<const A*>(sp.saved.rho) + row0,
              static_cast<const A*>(sp.saved.lse) + row0,
              static_cast<const A*>(sp.saved.log_row_sum) + row0,
              ch,
              sp.p.head_dim,
              sp.p.value_dim,
              static_cast<A>(sp.p.scale),
              sp.p.fuse,
              reinterpret_cast<A*>(smem + layout.stage_a),
              reinterpret_cast<A*>(smem + layout.stage_b),
              reinterpret_cast<A*>(smem + layout.logits),
              reinterpret_cast<A*>(smem + layout.grads),
              reinterpret_cast<A*>(smem + layout.delta)};

    __syncthreads();  // the previous pair is done with shared memory
    for (int64_t i = threadIdx.x; i < n; i += kThreads) P.delta[i] = A(0);
    // δ of every row, tile by tile in column order.
    for (int64_t r = 0; r < ch.count; ++r)
      for (int64_t q = 0; q < ch.count; ++q) {
        P.load_tile(r, q);
        P.gain(r, q, upper);
        P.add_row_sums(r, q, upper);
      }

    double dw[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t m = 0; m < ch.count; ++m)
      for (int64_t c = m + 1; c < ch.count; ++c) {
        const int32_t rows = ch.size(m), cols = ch.size(c);
        // Upper blocks have full rows; only the last chunk's columns may be fewer.
        const int64_t k = c == ch.count - 1 ? keep_last : keep_full;
        if (k < 1 || k >= int64_t{rows} * cols) continue;  // no choice, no relaxation
        P.load_tile(c, m);  // the mirror first: the block's own logits stay loaded after
        P.gain(c, m, lower);
        P.mask_gradient(c, m, lower);
        P.load_tile(m, c);
        P.gain(m, c, upper);
        P.mask_gradient(m, c, upper);

        // S = conv3x3(L, W) on the block (zero outside it), into grads (no longer needed).
        const int32_t pitch = ch.omega;
        auto logit = [&](int i, int j) -> A {
          return (i < 0 || j < 0 || i >= rows || j >= cols) ? A(0) : P.logits[i * pitch + j];
        };
        A* scores = P.grads;
        for (int e = threadIdx.x; e < rows * cols; e += kThreads) {
          const int i = e / cols, j = e % cols;
          A s = A(0);
          for (int a = 0; a < 3; ++a)
            for (int b = 0; b < 3; ++b) s += w[a * 3 + b] * logit(i + a - 1, j + b - 1);
          scores[i * pitch + j] = s;
        }
        __syncthreads();

        A kth, next;
        kth_and_next(scores, rows, cols, pitch, k, counts, kth, next);
        const A threshold = (kth + next) / A(2);
        if (!isfinite(threshold)) continue;  // the same on every thread
        double local = 0;
        for (int e = threadIdx.x; e < rows * cols; e += kThreads) local += scores[(e / cols) * pitch + e % cols];
        const double mean = cta_sum(local, sums) / (double(rows) * cols);
        local = 0;
        for (int e = threadIdx.x; e < rows * cols; e += kThreads) {
          const double d = scores[(e / cols) * pitch + e % cols] - mean;
          local += d * d;
        }
        const A spread = static_cast<A>(sqrt(cta_sum(local, sums) / (double(rows) * cols)));
        if (!(spread > A(0))) continue;

        for (int e = threadIdx.x; e < rows * cols; e += kThreads) {
          const int i = e / cols, j = e % cols;
          const A sig = A(1) / (A(1) + exp_acc(-(scores[i * pitch + j] - threshold) / spread));
          // An upper entry decides itself and its mirror.
          const A upstream = upper[i * pitch + j] + lower[j * pitch + i];
          const double grad_score = static_cast<double>(upstream * (sig * (A(1) - sig) / spread));
          if (grad_score == 0.0) continue;
          for (int a = 0; a < 3; ++a)
            for (int b = 0; b < 3; ++b) dw[a * 3 + b] += grad_score * static_cast<double>(logit(i + a - 1, j + b - 1));
        }
      }

    // The pair's share: a fixed-order sum over the CTA.
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int t = 0; t < 9; ++t) {
      const double s = warp_sum(dw[t]);
      if (lane == 0) sums[warp * 9 + t] = s;
    }
    __syncthreads();
    if (threadIdx.x < 9) {
      double total = 0;
      for (int w2 = 0; w2 < kWarps; ++w2) total += sums[w2 * 9 + threadIdx.x];
      partials[pair * 9 + threadIdx.x] = total;
    }
  }
}

// dW = Σ over pairs of their shares, in pair order; zeros when there are none.
template <typename A>
__global__ void sum_pairs_kernel(const double* partials, int64_t pairs, A* grad) {
  if (threadIdx.x >= 9) return;
  double total = 0;
  for (int64_t pair = 0; pair < pairs; ++pair) total += partials[pair * 9 + threadIdx.x];
  grad[threadIdx.x] = static_cast<A>(total);
}

template <typename T>
void launch(const ScoreKernelGradParams& sp, double* partials, size_t smem_limit, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t pairs = is_empty(sp.p) ? 0 : sp.p.pairs();
  if (pairs > 0) {
    const size_t bytes = Layout::of<A>(sp.p.block_size, sp.p.seqlen).bytes;
    if (bytes > smem_limit)
      throw std::invalid_argument("seqlen N = " + std::to_string(sp.p.seqlen) +
                                  " is too long for the bspf CUDA score-kernel gradient (it keeps one value per "
                                  "token in shared memory: " + std::to_string(bytes) + " bytes, the device allows " +
                                  std::to_string(smem_limit) + ")");
    const int64_t omega = sp.p.block_size, last = sp.p.seqlen - (sp.p.num_chunks() - 1) * omega;
    launch_kernel(pair_kernel<T>, grid_for(1, pairs), kThreads, bytes, stream,
                  "launching the score-kernel gradient kernel", sp, keep_count(sp.keep_ratio, omega, omega),
                  keep_count(sp.keep_ratio, omega, last), partials);
  }
  launch_kernel(sum_pairs_kernel<A>, dim3(1), 32, 0, stream, "launching the score-kernel gradient sum",
                static_cast<const double*>(partials), pairs, static_cast<A*>(sp.grad_score_kernel));
}

}  // namespace

void score_kernel_grad(const ScoreKernelGradParams& params, void* partials, int32_t device, std::uintptr_t stream) {
  validate(params);
  if (!is_empty(params.p) && partials == nullptr) throw std::invalid_argument("bspf CUDA kernels: partials is null");
  check(cudaSetDevice(device), "selecting the CUDA device (is an NVIDIA GPU with a working driver present?)");
  int optin = 0;
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "querying the device's shared memory");
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  double* sums = static_cast<double*>(partials);
  switch (params.p.dtype) {
    case DType::kFloat32: return launch<float>(params, sums, optin, s);
    case DType::kFloat64: return launch<double>(params, sums, optin, s);
    case DType::kFloat16: return launch<__half>(params, sums, optin, s);
    case DType::kBFloat16: return launch<__nv_bfloat16>(params, sums, optin, s);
  }
}

}  // namespace bspf::cuda
