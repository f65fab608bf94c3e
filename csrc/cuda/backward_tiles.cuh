// Building blocks of the backward kernels: staging operands into shared memory, the
// 64×64 strip products on warp_tile_16x8, the keep mask of a tile as one word per row,
// and the per-row values of a strip.
//
// A strip product leaves warp w the rows 16w … 16w+15 of the 64×64 result, all 64
// columns: acc[ct] is the 16×8 tile of columns 8ct … 8ct+7 in the mma C layout
// (frag_row/frag_col). Helpers here iterate over those entries with `for_each_entry`.
#pragma once

#include <type_traits>

#include "backward_plan.cuh"
#include "common.cuh"
#include "warp_gemm.cuh"

namespace bspf::cuda {

constexpr int kColTiles = kGradStrip / 8;  // 16×8 tiles per warp across a 64-wide result

template <typename A>
using StripAcc = A[kColTiles][4];

template <typename S, typename T>
__device__ __forceinline__ S to_staged(T value) {
  if constexpr (std::is_same<S, T>::value)
    return value;
  else
    return static_cast<S>(to_acc(value));
}

// A strip of rows of a (b, h) slice: rows [r0, r0 + count) of src.
template <typename T>
struct StripOperand {
  Rows<T> src;
  int64_t r0;
  int32_t count;
};

// dst[r][k] = src(r0 + r, k0 + k) for r < count and k0 + k < dim, zero elsewhere in
// [0, kGradStrip) × [0, depth). Consecutive threads read consecutive features of a row.
template <typename T>
__device__ void stage_slice(staged_t<T>* dst, int32_t pitch, const StripOperand<T>& a, int64_t k0, int32_t depth,
                            int64_t dim) {
  using S = staged_t<T>;
  for (int e = threadIdx.x; e < kGradStrip * depth; e += kThreads) {
    const int r = e / depth, k = e % depth;
    dst[r * pitch + k] = (r < a.count && k0 + k < dim) ? to_staged<S>(a.src(a.r0 + r, k0 + k)) : S(0.0f);
  }
}

// dst[f][k] = src(row_of(k), f0 + f) for f < kGradStrip and k < depth: features become rows
// so that a (64 × depth) tile times these columns is one warp_tile_16x8 per output tile.
// row_of(k) < 0 or f0 + f ≥ dim stages a zero.
template <typename T, typename RowOf>
__device__ void stage_transposed(staged_t<T>* dst, int32_t pitch, const Rows<T>& src, const RowOf& row_of,
                                 int64_t f0, int32_t depth, int64_t dim) {
  using S = staged_t<T>;
  for (int e = threadIdx.x; e < kGradStrip * depth; e += kThreads) {
    const int k = e / kGradStrip, f = e % kGradStrip;
    const int64_t row = row_of(k);
    dst[f * pitch + k] = (row >= 0 && f0 + f < dim) ? to_staged<S>(src(row, f0 + f)) : S(0.0f);
  }
}

// acc(r, c) = Σ_k a(r, k) · b(c, k) over k < dim, a and b staged `slice` features at a
// time through sa and sb. Starts with a barrier (earlier readers of sa, sb are done); ends
// without one after the last slice (dim ≥ 1) or at once (dim = 0, acc zero).
template <typename T>
__device__ void strip_product(StripAcc<acc_t<T>>& acc, const StripOperand<T>& a, const StripOperand<T>& b,
                              int64_t dim, staged_t<T>* sa, staged_t<T>* sb) {
  using Plan = BackwardPlan<T>;
  using A = acc_t<T>;
  using S = staged_t<T>;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int ct = 0; ct < kColTiles; ++ct)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[ct][r] = A(0);
  for (int64_t k0 = 0; k0 < dim; k0 += Plan::slice) {
    const int32_t depth = static_cast<int32_t>(padded_depth<T>(lesser<int64_t>(Plan::slice, dim - k0)));
    __syncthreads();
    stage_slice<T>(sa, Plan::slice_pitch, a, k0, depth, dim);
    stage_slice<T>(sb, Plan::slice_pitch, b, k0, depth, dim);
    __syncthreads();
    if (warp * 16 >= a.count) continue;  // warp-uniform: no rows of this warp
    const SmemRows<S> rows{sa + warp * 16 * Plan::slice_pitch, Plan::slice_pitch};
#pragma unroll
    for (int ct = 0; ct < kColTiles; ++ct)
      if (ct * 8 < b.count) warp_tile_16x8<T>(acc[ct], rows, SmemRows<S>{sb + ct * 8 * Plan::slice_pitch, Plan::slice_pitch}, depth);
  }
}

// acc(r, c) (+)= Σ_k a[r][k] · b[c][k], k < depth, both already staged (no barrier).
template <typename T>
__device__ void staged_product(StripAcc<acc_t<T>>& acc, bool accumulate, const staged_t<T>* a, int32_t a_pitch,
                               int32_t rows, const staged_t<T>* b, int32_t b_pitch, int32_t cols, int32_t depth) {
  using A = acc_t<T>;
  using S = staged_t<T>;
  const int warp = threadIdx.x >> 5;
  if (!accumulate)
#pragma unroll
    for (int ct = 0; ct < kColTiles; ++ct)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[ct][r] = A(0);
  if (warp * 16 >= rows) return;
  const SmemRows<S> left{a + warp * 16 * a_pitch, a_pitch};
#pragma unroll
  for (int ct = 0; ct < kColTiles; ++ct)
    if (ct * 8 < cols) warp_tile_16x8<T>(acc[ct], left, SmemRows<S>{b + ct * 8 * b_pitch, b_pitch}, depth);
}

// fn(row, col, value&) for every entry of this thread's part of a strip product.
template <typename A, typename Fn>
__device__ __forceinline__ void for_each_entry(StripAcc<A>& acc, const Fn& fn) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int ct = 0; ct < kColTiles; ++ct)
#pragma unroll
    for (int r = 0; r < 4; ++r) fn(warp * 16 + frag_row(lane, r), ct * 8 + frag_col(lane, r), r >> 1, acc[ct][r]);
}

// dst[r · ld + c] += acc(r, c) for r < rows, c < cols: a strip's rows of a gradient
// accumulator, each entry owned by one thread.
template <typename A>
__device__ void add_to_rows(StripAcc<A>& acc, A* dst, int64_t ld, int32_t rows, int32_t cols) {
  for_each_entry(acc, [&](int r, int c, int, A& v) {
    if (r < rows && c < cols) dst[r * ld + c] += v;
  });
}

// bits[r], bit q = M(row r of `rows`, column q of `cols`), for a tile between two strips of
// whole chunks; zero past either strip. Ends without a barrier.
__device__ inline void load_tile_mask(uint64_t* bits, const uint64_t* words, const Chunks& ch, const GradStrip& rows,
                                      const GradStrip& cols) {
  for (int r = threadIdx.x; r < kGradStrip; r += kThreads) {
    uint64_t w = 0;
    if (r < rows.rows) {
      const uint64_t* row_words = words + (rows.r0 + r) * ch.count;
      for (int32_t c = cols.first_chunk; c < cols.last_chunk; ++c)
        w |= (row_words[c] & low_bits(ch.size(c))) << (ch.begin(c) - cols.r0);
    }
    bits[r] = w;
  }
}

// H of SPEC §3.6 for column q of a strip of whole chunks: 1 − (differing bits of the two
// rows' words over q's chunk) / (the chunk's size).
template <typename A>
__device__ __forceinline__ A pattern_similarity(uint64_t wa, uint64_t wb, int q, int32_t omega, int32_t cols) {
  const int start = q / omega * omega;
  const int32_t size = lesser<int32_t>(omega, cols - start);
  return A(1) - static_cast<A>(__popcll(((wa ^ wb) >> start) & low_bits(size))) / static_cast<A>(size);
}

// A's part of logit entry (r, q) in row `target` (SPEC §3.8, A = R / Z): P(r, q)/Z_r for a kept
// entry (target = r, moved = false), ρ_r·H·P(r, q)/Z_b for one that moves to target = b(r).
// x = min(L(r, q) − lse_r, 0) and prob = exp(x). Linear, prob·factor/Z, where Z_target is at
// least LinearFloor (exact there, common.cuh); else formed as one exponent,
// exp(x + log ρ_r − log Z_target)·H, which is finite where prob underflows and 1/Z overflows
// (extreme logits, docs/spec.md §3a). H = 0 (the two rows' patterns differ in every bit of
// the chunk) moves nothing: P/Z_target alone may overflow there, so it is never formed.
template <typename A>
__device__ __forceinline__ A weight_of(const StripRows<A>& rows, int r, int target, A x, A prob, bool moved,
                                       A similarity) {
  const A inv_z = rows.inv_z(target);
  if (inv_z > A(0)) return (moved ? rows.rho(r) * similarity : A(1)) * prob * inv_z;
  if (moved && !(similarity > A(0))) return A(0);
  return (moved ? similarity : A(1)) * exp_acc(x + (moved ? rows.log_rho(r) : A(0)) - rows.log_z(target));
}

// Offsets of δ, s and dρ inside the (3, B, H, N) row statistics.
enum RowStat : int64_t { kDelta = 0, kDotP = 1, kGradRho = 2 };

// The saved per-row values of a strip (and, with stats, its row statistics); rows past the
// strip get neutral values. Ends without a barrier.
template <typename A>
__device__ void load_strip_rows(const StripRows<A>& dst, const BackwardParams& bp, int64_t pair_row0,
                                const GradStrip& s, const A* stats, int64_t stat_stride) {
  const A* lse = static_cast<const A*>(bp.saved.lse) + pair_row0;
  const A* log_z = static_cast<const A*>(bp.saved.log_row_sum) + pair_row0;
  const A* rho = static_cast<const A*>(bp.saved.rho) + pair_row0;
  const int32_t* match = bp.saved.match + pair_row0;
  for (int r = threadIdx.x; r < kGradStrip; r += kThreads) {
    const bool in = r < s.rows;
    const int64_t i = s.r0 + r;
    dst.lse(r) = in ? lse[i] : A(0);
    const A lz = in ? log_z[i] : A(0);
    dst.log_z(r) = lz;
    dst.inv_z(r) = lz >= LinearFloor<A>::log_value ? exp_acc(-lz) : A(0);
    dst.rho(r) = in ? rho[i] : A(0);
    dst.log_rho(r) = in && rho[i] > A(0) ? log_acc(rho[i]) : A(0);
    dst.match(r) = in ? static_cast<int32_t>(match[i] - s.r0) : r;
    dst.delta(r) = in && stats ? stats[kDelta * stat_stride + i] : A(0);
    dst.dot_p(r) = in && stats ? stats[kDotP * stat_stride + i] : A(0);
    dst.grad_rho(r) = in && stats ? stats[kGradRho * stat_stride + i] : A(0);
  }
}

}  // namespace bspf::cuda
