// Backward kernel 2 (SPEC §4): dX and dV, one CTA per (column strip J of whole chunks,
// (b, h)), which owns the gradient rows of J and sweeps the row strips I. Per tile (J, I),
// warp w holding rows j = 16w … 16w+15 of J against all i of I:
//   1. dR(i, j) = M(i,j)·(g_i·v_j − δ_i)/Z_i  → DR1[j][i]   (product V_J·G_Iᵀ)
//   2. dR(j, i) = M(j,i)·(g_j·v_i − δ_j)/Z_j  → DR2[j][i]   (product G_J·V_Iᵀ)
//   3. L = scale·X_J·X_Iᵀ (as the forward computes row j), P(i,j), P(j,i), and for both
//      entries dP (kept: dR; pruned and fused: α·dR of the match's entry, α = ρ·H), dL =
//      P·(dP − s); then dS[j][i] = scale·(dL(i,j) + dL(j,i)) and the shares of A that
//      reach V_J: W[j][i] = M·P(i,j)/Z_i (through g_i), W[j][k_I + i] = α·P(i,j)/Z_b(i)
//      (through g_b(i); i's match b(i) is in I since I is whole chunks);
//   4. dX_J += dS·X_I and dV_J += W·[G_I; G_b(I)], X_I and G staged transposed, 64
//      features at a time, added into the caller's zeroed accumulators (J's rows are this
//      CTA's alone, and the strips I come in order: deterministic, no atomics);
// then the cosine terms of dρ (SPEC §4, last line), into x_i and x_b(i), both in J.
//
// fp16/bf16: every product runs on tensor cores with fp32 accumulation; dS and W are
// rounded to the input format as tensor-core operands (as FlashAttention rounds dS and
// P). That is a relative error of 2⁻¹¹ (fp16) or 2⁻⁸ (bf16) per entry, independent across
// entries, so a gradient entry errs by about u·‖row of dS‖·‖x‖ ≲ 1e-3 (fp16) and 8e-3 (bf16)
// of the gradient's scale: inside tests/test_ops_cuda.py's GRAD_RTOL (1e-2, 5e-2) by
// a factor of about 10. dR, L, P and every sum stay in fp32.
#pragma once

#include "backward_plan.cuh"
#include "backward_tiles.cuh"
#include "common.cuh"

namespace bspf::cuda {

// The cosine behind ρ (SPEC §4): row q of J receives dρ_q·∂cos/∂x_q (partner x_b(q)) and
// dρ_i·∂cos/∂x_b(i) for every i whose match is q (partner x_i), i in increasing order.
// Starts with a barrier (the strip's earlier gradient adds are complete and visible).
template <typename T>
__device__ void add_cosine_terms(const StripRows<acc_t<T>>& own, const Rows<T>& x, const GradStrip& J,
                                 const Chunks& ch, int64_t dim, acc_t<T>* grad_x) {
  using A = acc_t<T>;
  const A eps = static_cast<A>(kCosEps);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  for (int q = warp; q < J.rows; q += kWarps) {
    const int b = own.match[q];
    A norm2 = A(0), cross = A(0);
    for (int64_t f = lane; f < dim; f += 32) {
      const A xq = to_acc(x(J.r0 + q, f));
      norm2 = fma_acc(xq, xq, norm2);
      cross = fma_acc(xq, to_acc(x(J.r0 + b, f)), cross);
    }
    norm2 = warp_sum(norm2);
    cross = warp_sum(cross);
    if (lane == 0) {
      own.norm2[q] = norm2;
      own.cross[q] = cross;
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < int64_t{J.rows} * dim; e += kThreads) {
    const int q = static_cast<int>(e / dim);
    const int64_t f = e % dim;
    const int64_t c = (J.r0 + q) / ch.omega;
    const int lo = static_cast<int>(ch.begin(c) - J.r0), hi = lo + ch.size(c);
    const A xq = to_acc(x(J.r0 + q, f));
    A sum = A(0);
    for (int i = lo; i < hi; ++i) {
      const int b = own.match[i];
      const A grad = own.grad_rho[i];
      if (b == i || !(own.rho[i] > A(0)) || grad == A(0) || (i != q && b != q)) continue;
      const A norm_i = sqrt_acc(own.norm2[i]), norm_b = sqrt_acc(own.norm2[b]);
      const A prod = norm_i * norm_b;
      // i == q: the derivative in x_i, partner x_b; else q = b(i), partner x_i.
      const int partner = i == q ? b : i;
      const A norm_q = i == q ? norm_i : norm_b;
      const A x_partner = to_acc(x(J.r0 + partner, f));
      if (prod >= eps) {
        const A cos = own.cross[i] / prod;
        sum += grad * (x_partner / prod - cos * xq / (norm_q * norm_q));
      } else {
        sum += grad * x_partner / eps;
      }
    }
    grad_x[(J.r0 + q) * dim + f] += sum;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kBackwardBlocksPerSm)
    gradients_kernel(BackwardParams bp, BackwardPlan plan, const void* row_stats, void* grad_qk_acc,
                     void* grad_v_acc) {
  using A = acc_t<T>;
  using S = staged_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  A* dr1 = reinterpret_cast<A*>(smem + plan.g_dr);  // [j][i] = dR(i, j)
  A* dr2 = dr1 + kGradStrip * plan.tile_pitch;       // [j][i] = dR(j, i)
  S* transposed = reinterpret_cast<S*>(smem + plan.g_dr);  // step 4 only: the dR tiles are dead
  S* ds = reinterpret_cast<S*>(smem + plan.g_ds);
  S* w = reinterpret_cast<S*>(smem + plan.g_w);
  S* slice_a = reinterpret_cast<S*>(smem + plan.g_slice_a);
  S* slice_b = reinterpret_cast<S*>(smem + plan.g_slice_b);
  uint64_t* mask_ij = reinterpret_cast<uint64_t*>(smem + plan.g_masks);  // rows I, columns J
  uint64_t* mask_ji = mask_ij + kGradStrip;                              // rows J, columns I
  const StripRows<A> own(smem + plan.g_rows_j);
  const StripRows<A> other(smem + plan.g_rows_i);

  const Chunks ch(bp.p.seqlen, bp.p.block_size);
  const GradStrips strips(ch);
  const GradStrip J = strips.at(ch, static_cast<int32_t>(blockIdx.x));
  const int64_t n = ch.n, D = bp.p.head_dim, Dv = bp.p.value_dim;
  const A scale = static_cast<A>(bp.p.scale);
  const bool fuse = bp.p.fuse;
  const int32_t tp = plan.tile_pitch;
  const int64_t stat_stride = pair_count(bp.p) * n;

  for (int64_t pair = blockIdx.y; pair < pair_count(bp.p); pair += gridDim.y) {
    const Rows<T> x = pair_rows<T>(bp.qk, bp.qk_stride, pair, bp.p.heads);
    const Rows<T> v = pair_rows<T>(bp.v, bp.v_stride, pair, bp.p.heads);
    const Rows<T> g = pair_rows<T>(bp.grad_out, bp.grad_out_stride, pair, bp.p.heads);
    const int64_t row0 = pair * n;
    const uint64_t* words = bp.saved.mask_words + row0 * ch.count;
    const A* stats = static_cast<const A*>(row_stats) + row0;
    A* grad_x = static_cast<A*>(grad_qk_acc) + row0 * D;
    A* grad_v = Dv > 0 ? static_cast<A*>(grad_v_acc) + row0 * Dv : nullptr;

    __syncthreads();  // the previous pair is done with shared memory
    load_strip_rows<A>(own, bp, row0, J, stats, stat_stride);

    for (int32_t t = 0; t < strips.count; ++t) {
      const GradStrip I = strips.at(ch, t);
      const int32_t depth_i = static_cast<int32_t>(padded_depth<T>(I.rows));  // k_I
      __syncthreads();  // the previous tile is done with the rows, masks and tiles
      load_strip_rows<A>(other, bp, row0, I, stats, stat_stride);
      load_tile_mask(mask_ij, words, ch, I, J);
      load_tile_mask(mask_ji, words, ch, J, I);
      __syncthreads();  // rows and masks are loaded (the products below may run no slice: Dv = 0)
      StripAcc<A> acc;

      // Steps 1 and 2.
      strip_product<T>(acc, {v, J.r0, J.rows}, {g, I.r0, I.rows}, Dv, slice_a, slice_b, plan);
      for_each_entry(acc, [&](int j, int i, int, A& value) {
        const bool kept = j < J.rows && i < I.rows && bit_of(mask_ij[i], j);
        dr1[j * tp + i] = kept ? (value - other.delta[i]) / other.z[i] : A(0);
      });
      strip_product<T>(acc, {g, J.r0, J.rows}, {v, I.r0, I.rows}, Dv, slice_a, slice_b, plan);
      for_each_entry(acc, [&](int j, int i, int, A& value) {
        const bool kept = j < J.rows && i < I.rows && bit_of(mask_ji[j], i);
        dr2[j * tp + i] = kept ? (value - own.delta[j]) / own.z[j] : A(0);
      });

      // Step 3 (the product's barriers complete DR1 and DR2: D ≥ 1).
      strip_product<T>(acc, {x, J.r0, J.rows}, {x, I.r0, I.rows}, D, slice_a, slice_b, plan);
      for_each_entry(acc, [&](int j, int i, int, A& logit_acc) {
        if (i >= depth_i) return;  // W's second half starts at k_I
        A grad_score = A(0), kept_share = A(0), fused_share = A(0);
        if (j < J.rows && i < I.rows) {
          const A logit = scale * logit_acc;
          // Entry (i, j): row i of I, column j of J.
          const A p_ij = exp_acc(logit - other.lse[i]);
          const uint64_t wi = mask_ij[i];
          A dp_ij = A(0);
          if (bit_of(wi, j)) {
            dp_ij = dr1[j * tp + i];
            kept_share = p_ij / other.z[i];
          } else if (other.fuses(i, fuse)) {
            const int b = other.match[i];
            if (bit_of(mask_ij[b], j)) {
              const A alpha = other.rho[i] * pattern_similarity<A>(wi, mask_ij[b], j, ch.omega, J.rows);
              dp_ij = alpha * dr1[j * tp + b];
              fused_share = alpha * p_ij / other.z[b];
            }
          }
          // Entry (j, i): row j of J, column i of I.
          const A p_ji = exp_acc(logit - own.lse[j]);
          const uint64_t wj = mask_ji[j];
          A dp_ji = A(0);
          if (bit_of(wj, i)) {
            dp_ji = dr2[j * tp + i];
          } else if (own.fuses(j, fuse)) {
            const int b = own.match[j];
            if (bit_of(mask_ji[b], i))
              dp_ji = own.rho[j] * pattern_similarity<A>(wj, mask_ji[b], i, ch.omega, I.rows) * dr2[b * tp + i];
          }
          grad_score = scale * (p_ij * (dp_ij - other.dot_p[i]) + p_ji * (dp_ji - own.dot_p[j]));
        }
        ds[j * plan.ds_pitch + i] = from_acc<S>(grad_score);
        w[j * plan.w_pitch + i] = from_acc<S>(kept_share);
        w[j * plan.w_pitch + depth_i + i] = from_acc<S>(fused_share);
      });

      // Step 4: dX_J += dS·X_I, then dV_J += W·[G_I; G_b(I)], 64 features at a time.
      for (int64_t f0 = 0; f0 < D; f0 += kGradStrip) {
        __syncthreads();  // dS complete; DR1/DR2 (or the previous slice) no longer read
        stage_transposed<T>(transposed, plan.w_pitch, x,
                            [&](int k) { return k < I.rows ? I.r0 + k : int64_t{-1}; }, f0, depth_i, D);
        __syncthreads();
        staged_product<T>(acc, ds, plan.ds_pitch, J.rows, transposed, plan.w_pitch,
                          static_cast<int32_t>(lesser<int64_t>(kGradStrip, D - f0)), depth_i);
        add_to_rows(acc, grad_x + J.r0 * D + f0, D, J.rows, static_cast<int32_t>(lesser<int64_t>(kGradStrip, D - f0)));
      }
      const int32_t depth_v = fuse ? 2 * depth_i : depth_i;
      for (int64_t f0 = 0; f0 < Dv; f0 += kGradStrip) {
        __syncthreads();
        stage_transposed<T>(transposed, plan.w_pitch, g,
                            [&](int k) {
                              if (k < depth_i) return k < I.rows ? I.r0 + k : int64_t{-1};
                              const int i = k - depth_i;
                              return i < I.rows ? I.r0 + other.match[i] : int64_t{-1};
                            },
                            f0, depth_v, Dv);
        __syncthreads();
        staged_product<T>(acc, w, plan.w_pitch, J.rows, transposed, plan.w_pitch,
                          static_cast<int32_t>(lesser<int64_t>(kGradStrip, Dv - f0)), depth_v);
        add_to_rows(acc, grad_v + J.r0 * Dv + f0, Dv, J.rows,
                    static_cast<int32_t>(lesser<int64_t>(kGradStrip, Dv - f0)));
      }
    }
    if (fuse) add_cosine_terms<T>(own, x, J, ch, D, grad_x);
  }
}

}  // namespace bspf::cuda
