// Backward kernel 1 (SPEC §4): the row statistics δ_i, s_i and dρ_i, one CTA per
// (strip of whole chunks, (b, h)), one sweep over the column strips.
//
// Per column strip J the CTA recomputes L = scale·X_s·X_Jᵀ and dA = G_s·V_Jᵀ (tensor cores
// for fp16/bf16); then every row i adds, over the columns j, with a(i, j) = P(i, j)/Z_i on
// its kept entries and f(i, j) = ρ_i·H·P(i, j)/Z_b on those it moves to b = b(i) (each is
// A's part of that entry, formed as one exponent from the saved lse and log Z, so it is
// finite where P underflows and 1/Z overflows: docs/spec.md §3a),
//   u0 = Σ a·dA(i,j)             u1 = Σ a
//   u2 = Σ f·dA(b(i),j)          u3 = Σ f
// From these, δ being linear in dA:
//   δ_i  = u0_i + Σ_{i': b(i') = i} u2_i'        (the fused shares that reach row i)
//   f_i  = u2_i − δ_b·u3_i                       (b = b(i); 0 when i fuses nothing)
//   dρ_i = f_i / ρ_i
//   s_i  = u0_i − δ_i·u1_i + f_i
// which are SPEC §4's sums regrouped (s_i = Σ_j P·dP, δ_i = Σ_k A·dA), so one sweep replaces
// two and R is never formed. The regrouping subtracts sums of size |dA| where the spec
// subtracts entries; the difference is a rounding of |dA|·u, far below every tolerance.
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
        const uint64_t wi = mask[r];
        const bool own = bit_of(wi, q);
        int b = r;
        A similarity = A(1);
        if (!own) {
          if (!rows.fuses(r, fuse)) return;
          b = rows.match(r);
          const uint64_t wb = mask[b];
          if (!bit_of(wb, q)) return;
          similarity = pattern_similarity<A>(wi, wb, q, ch.omega, J.rows);
          // H = 0 moves nothing (and P/Z_b alone may overflow): such an entry is skipped. Else
          // H ≥ 1/64 and the exponent below is at most log 64.
          if (!(similarity > A(0))) return;
        }
        // One exponent for either kind of entry, a or f: exp(x − log Z_r) or H·exp(x + log ρ_r − log Z_b).
        const A x = at_most_zero(scale * logit - rows.lse(r));
        const A weight = similarity * exp_acc(own ? x - rows.log_z(r) : x + rows.log_rho(r) - rows.log_z(b));
        const A weighted_grad = weight * grads[b * tp + q];
        if (own) {  // constant indices: part stays in registers
          part[half][0] += weighted_grad;
          part[half][1] += weight;
        } else {
          part[half][2] += weighted_grad;
          part[half][3] += weight;
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
        if (k != i && rows.match(k) == i && rows.fuses(k, fuse)) fused_in += u2[k];
      rows.delta(i) = u0[i] + fused_in;
    }
    __syncthreads();
    A* stats = static_cast<A*>(row_stats) + row0 + s.r0;
    for (int i = tid; i < s.rows; i += kThreads) {
      A fused = A(0), grad_rho = A(0);
      if (rows.fuses(i, fuse)) {
        fused = u2[i] - rows.delta(rows.match(i)) * u3[i];
        grad_rho = fused / rows.rho(i);
      }
      stats[kDelta * stat_stride + i] = rows.delta(i);
      stats[kDotP * stat_stride + i] = u0[i] - rows.delta(i) * u1[i] + fused;
      stats[kGradRho * stat_stride + i] = grad_rho;
    }
  }
}

}  // namespace bspf::cuda
