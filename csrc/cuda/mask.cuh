// The keep mask (SPEC §3.2–3.3): one CTA per block (m, n) with m ≤ n of one (b, h).
// Upper blocks compute their logit tile, score it with the 3×3 kernel and keep the k
// largest scores; the threshold is found by bisection on order-preserving integer keys
// (only the k-th key is needed, not a sort), ties at the threshold go to the smaller
// row-major index. The CTA writes the block's row words and, transposed, the mirror
// block's words; a diagonal CTA writes its full words. Every word is written once.
#pragma once

#include "common.cuh"

namespace bspf::cuda {

// Order-preserving keys: a larger score has a larger key. NaN ranks as −inf (last, as on
// the CPU) and −0 as +0 so that equal scores have equal keys and the index decides.
__device__ __forceinline__ uint32_t order_key(float s) {
  if (isnan(s)) s = -INFINITY;
  if (s == 0.0f) s = 0.0f;
  const uint32_t u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ unsigned long long order_key(double s) {
  if (isnan(s)) s = -static_cast<double>(INFINITY);
  if (s == 0.0) s = 0.0;
  const unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(s));
  return (u >> 63) ? ~u : (u | (1ull << 63));
}

template <typename A> struct KeyOf { using type = uint32_t; };
template <> struct KeyOf<double> { using type = unsigned long long; };

struct MaskLayout {
  size_t sa, sb, logits, keys, keep, scratch, bytes;
  template <typename A>
  __host__ __device__ static MaskLayout make(int32_t omega) {
    using Key = typename KeyOf<A>::type;
    const size_t pitch = static_cast<size_t>(omega) + 2;
    const size_t block = static_cast<size_t>(omega) * omega;
    SmemPlan plan;
    MaskLayout l{};
    l.sa = plan.take(kDepth * kTilePad, sizeof(A));
    l.sb = plan.take(kDepth * kTilePad, sizeof(A));
    l.logits = plan.take(pitch * pitch, sizeof(A));
    l.keys = plan.take(block, sizeof(Key));
    l.keep = plan.take(block, 1);
    l.scratch = plan.take(kWarps, sizeof(int));
    l.bytes = plan.bytes;
    return l;
  }
};

// keep_full / keep_last: k for an upper block whose column chunk is full / the last one
// (rows are always a full chunk above the diagonal), computed on the host by keep_count.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    mask_kernel(ForwardParams fp, int64_t keep_full, int64_t keep_last) {
  using A = acc_t<T>;
  using Key = typename KeyOf<A>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  const Chunks ch(fp.p.seqlen, fp.p.block_size);
  const int32_t C = ch.count;
  const int32_t m = blockIdx.x / C, n = blockIdx.x % C;
  if (m > n) return;  // the lower blocks are mirrors, written by their upper block

  const MaskLayout lay = MaskLayout::make<A>(ch.omega);
  A* sa = reinterpret_cast<A*>(smem + lay.sa);
  A* sb = reinterpret_cast<A*>(smem + lay.sb);
  A* logits = reinterpret_cast<A*>(smem + lay.logits);
  Key* keys = reinterpret_cast<Key*>(smem + lay.keys);
  unsigned char* keep = smem + lay.keep;
  int* scratch = reinterpret_cast<int*>(smem + lay.scratch);

  const int32_t pitch = ch.omega + 2;  // the block with its zero border (conv padding)
  const A* w = static_cast<const A*>(fp.score_kernel);
  const int64_t r0 = ch.begin(m), c0 = ch.begin(n);
  const int32_t rows = ch.size(m), cols = ch.size(n), count = rows * cols;
  const int64_t k = (n == C - 1) ? keep_last : keep_full;
  const int tid = threadIdx.x, lane = tid & 31;

  for (int64_t pair = blockIdx.y; pair < pair_count(fp.p); pair += gridDim.y) {
    uint64_t* words = fp.saved.mask_words + pair * ch.n * C;
    if (m == n) {
      for (int i = tid; i < rows; i += kThreads) words[(r0 + i) * C + m] = low_bits(rows);
      continue;
    }

    // Logits of the block into the interior of a zeroed (Ω+2)² tile.
    __syncthreads();  // the previous pair's readers are done
    for (int e = tid; e < pitch * pitch; e += kThreads) logits[e] = A(0);
    const Rows<T> x = pair_rows<T>(fp.qk, fp.qk_stride, pair, fp.p.heads);
    tile_product(x, r0, rows, x, c0, cols, fp.p.head_dim, static_cast<A>(fp.p.scale), sa, sb, logits + pitch + 1,
                 pitch);
    __syncthreads();

    // S = conv3x3(L, W), zero padded, as keys.
    for (int e = tid; e < count; e += kThreads) {
      const int i = e / cols, j = e % cols;
      A s = A(0);
#pragma unroll
      for (int a = 0; a < 3; ++a)
#pragma unroll
        for (int b = 0; b < 3; ++b) s += w[a * 3 + b] * logits[(i + a) * pitch + (j + b)];
      keys[e] = order_key(s);
    }
    __syncthreads();

    if (k >= count) {
      for (int e = tid; e < count; e += kThreads) keep[e] = 1;
    } else if (k <= 0) {
      for (int e = tid; e < count; e += kThreads) keep[e] = 0;
    } else {
      // The k-th largest key t: the largest t with #{key ≥ t} ≥ k, built bit by bit.
      Key t = 0;
      for (int bit = 8 * static_cast<int>(sizeof(Key)) - 1; bit >= 0; --bit) {
        const Key candidate = t | (Key{1} << bit);
        int local = 0;
        for (int e = tid; e < count; e += kThreads) local += keys[e] >= candidate;
        if (block_sum(local, scratch) >= k) t = candidate;
      }
      int local = 0;
      for (int e = tid; e < count; e += kThreads) {
        const bool above = keys[e] > t;
        keep[e] = above;
        local += above;
      }
      // Of the keys equal to t, the first (k − #above) in row-major order are kept.
      const int need = static_cast<int>(k) - block_sum(local, scratch);
      if (tid < 32) {
        int taken = 0;
        for (int base = 0; base < count && taken < need; base += 32) {
          const int e = base + lane;
          const bool tie = e < count && keys[e] == t;
          const unsigned ballot = __ballot_sync(0xffffffffu, tie);
          const int before = taken + __popc(ballot & ((1u << lane) - 1u));
          if (tie && before < need) keep[e] = 1;
          taken += __popc(ballot);
        }
      }
    }
    __syncthreads();

    // Row words of block (m, n) and column words of its mirror (n, m).
    for (int i = tid; i < rows; i += kThreads) {
      uint64_t word = 0;
      for (int j = 0; j < cols; ++j) word |= static_cast<uint64_t>(keep[i * cols + j]) << j;
      words[(r0 + i) * C + n] = word;
    }
    for (int j = tid; j < cols; j += kThreads) {
      uint64_t word = 0;
      for (int i = 0; i < rows; ++i) word |= static_cast<uint64_t>(keep[i * cols + j]) << i;
      words[(c0 + j) * C + m] = word;
    }
  }
}

}  // namespace bspf::cuda
