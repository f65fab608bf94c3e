// Backward kernel 1 (SPEC §4): the row statistics δ_i, s_i and dρ_i, one CTA per
// (strip of whole chunks, (b, h)), one sweep over the column strips.
//
// Per column strip J the CTA recomputes L = scale·X_s·X_Jᵀ and dA = G_s·V_Jᵀ (tensor cores
// for fp16/bf16) and P = exp(L − lse); then every row i adds, over the columns j,
//   u0 = Σ M·P·dA(i,j)           u1 = Σ M·P
//   u2 = Σ F·H·P·dA(b(i),j)      u3 = Σ F·H·P        (F = (1 − M(i,j))·M(b(i),j), i fusing)
// From these, with Z saved by the forward and δ linear in dA:
//   δ_i  = (u0_i + Σ_{i': b(i') = i} ρ_i'·u2_i') / Z_i    (the fused shares that reach row i)
//   dρ_i = (u2_i − δ_b·u3_i) / Z_b                          (b = b(i); 0 when i fuses nothing)
//   s_i  = (u0_i − δ_i·u1_i) / Z_i + ρ_i·dρ_i
// which are SPEC §4's sums regrouped, so one sweep replaces two and R is never formed. The
// regrouping subtracts sums of size |dA| where the spec subtracts entries; the difference
// is a rounding of |dA|·u, far below every tolerance (the gradients carry P·|dA|).
// Each row is summed by one warp in column order: deterministic.
#pragma once

#include "backward_plan.cuh"
#include "backward_tiles.cuh"
#include "common.cuh"

namespace bspf::cuda {

template <typename T>
__global__ void __launch_bounds__(kThreads, kBackwardBlocksPerSm)
    row_stats_kernel(BackwardParams bp, void* row_stats) {
  using Plan = BackwardPlan<T>;
  using A = acc_t<T>;
  using S = staged_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  S* slice_a = reinterpret_cast<S*>(smem + Plan::r_slice_a);
  S* slice_b = reinterpret_cast<S*>(smem + Plan::r_slice_b);
  A* grads = reinterpret_cast<A*>(smem + Plan::r_grads);  // dA(i, j) of the tile, pitch tile_pitch
  uint64_t* mask = reinterpret_cast<uint64_t*>(smem + Plan::r_mask);
  const StripRows<A> rows{smem + Plan::r_rows};
  A* sums = reinterpret_cast<A*>(smem + Plan::r_sums);  // u0 … u3, kGradStrip each

  const Chunks ch(bp.p.seqlen, bp.p.block_size);
  const GradStrips strips(ch);
  const GradStrip s = strips.at(ch, static_cast<int32_t>(blockIdx.x));
  const int64_t n = ch.n, D = bp.p.head_dim, Dv = bp.p.value_dim;
  const A scale = static_cast<A>(bp.p.scale);
  const bool fuse = bp.p.fuse;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int32_t tp = Plan::tile_pitch;
  const int64_t stat_stride = pair_count(bp.p) * n;

  for (int64_t pair = blockIdx.y; pair < pair_count(bp.p); pair += gridDim.y) {
    const Rows<T> x = pair_rows<T>(bp.qk, bp.qk_stride, pair, bp.p.heads);
    const Rows<T> v = pair_rows<T>(bp.v, bp.v_stride, pair, bp.p.heads);
    const Rows<T> g = pair_rows<T>(bp.grad_out, bp.grad_out_stride, pair, bp.p.heads);
    const int64_t row0 = pair * n;
    const uint64_t* words = bp.saved.mask_words + row0 * ch.count;

    __syncthreads();  // the previous pair is done with shared memory
    load_strip_rows<A>(rows, bp, row0, s, nullptr, 0);
    for (int e = tid; e < 4 * kGradStrip; e += kThreads) sums[e] = A(0);

    for (int32_t t = 0; t < strips.count; ++t) {
      const GradStrip J = strips.at(ch, t);
      __syncthreads();  // the previous tile's readers of mask and grads are done
      load_tile_mask(mask, words, ch, s, J);
      StripAcc<A> acc;
      strip_product<T>(acc, {g, s.r0, s.rows}, {v, J.r0, J.rows}, Dv, slice_a, slice_b);
      for_each_entry(acc, [&](int r, int q, int, A& value) { grads[r * tp + q] = value; });
      // The logits' product ends with barriers after the stores above (D ≥ 1): dA and the
      // mask are complete when the entries are read.
      strip_product<T>(acc, {x, s.r0, s.rows}, {x, J.r0, J.rows}, D, slice_a, slice_b);
      if (warp * 16 >= s.rows) continue;  // warp-uniform
      A part[2][4] = {{A(0), A(0), A(0), A(0)}, {A(0), A(0), A(0), A(0)}};
      for_each_entry(acc, [&](int r, int q, int half, A& logit) {
        if (r >= s.rows || q >= J.rows) return;
        const A prob = exp_acc(scale * logit - rows.lse(r));
        const uint64_t wi = mask[r];
        if (bit_of(wi, q)) {
          part[half][0] += prob * grads[r * tp + q];
          part[half][1] += prob;
        } else if (rows.fuses(r, fuse)) {
          const int b = rows.match(r);
          const uint64_t wb = mask[b];
          if (bit_of(wb, q)) {
            const A weighted = pattern_similarity<A>(wi, wb, q, ch.omega, J.rows) * prob;
            part[half][2] += weighted * grads[b * tp + q];
            part[half][3] += weighted;
          }
        }
      });
      // The four lanes of a row (lane & 3) hold its columns: reduce them in a fixed tree.
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          A value = part[half][k];
          value += __shfl_xor_sync(0xffffffffu, value, 1);
          value += __shfl_xor_sync(0xffffffffu, value, 2);
          const int r = warp * 16 + (lane >> 2) + 8 * half;
          if ((lane & 3) == 0 && r < s.rows) sums[k * kGradStrip + r] += value;
        }
    }
    __syncthreads();

    const A* u0 = sums;
    const A* u1 = sums + kGradStrip;
    const A* u2 = sums + 2 * kGradStrip;
    const A* u3 = sums + 3 * kGradStrip;
    for (int i = tid; i < s.rows; i += kThreads) {
      const int64_t c = (s.r0 + i) / ch.omega;
      const int lo = static_cast<int>(ch.begin(c) - s.r0), hi = lo + ch.size(c);
      A fused_in = A(0);  // sources in increasing order
      for (int k = lo; k < hi; ++k)
        if (k != i && rows.match(k) == i && rows.fuses(k, fuse)) fused_in += rows.rho(k) * u2[k];
      rows.delta(i) = (u0[i] + fused_in) / rows.z(i);
    }
    __syncthreads();
    A* stats = static_cast<A*>(row_stats) + row0 + s.r0;
    for (int i = tid; i < s.rows; i += kThreads) {
      A grad_rho = A(0);
      if (rows.fuses(i, fuse)) {
        const int b = rows.match(i);
        grad_rho = (u2[i] - rows.delta(b) * u3[i]) / rows.z(b);
      }
      stats[kDelta * stat_stride + i] = rows.delta(i);
      stats[kDotP * stat_stride + i] = (u0[i] - rows.delta(i) * u1[i]) / rows.z(i) + rows.rho(i) * grad_rho;
      stats[kGradRho * stat_stride + i] = grad_rho;
    }
  }
}

}  // namespace bspf::cuda
