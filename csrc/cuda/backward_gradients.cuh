// Backward kernel 2 (SPEC §4): dX and dV, one CTA per (column strip J of whole chunks,
// (b, h)), which owns the gradient rows of J and sweeps the row strips I. Per tile (J, I),
// warp w holding rows j = 16w … 16w+15 of J against all i of I:
//   1. D(i, j) = M(i,j)·(g_i·v_j − δ_i) = Z_i·dR(i, j)  → DR1[j][i]   (product V_J·G_Iᵀ)
//   2. D(j, i) = M(j,i)·(g_j·v_i − δ_j) = Z_j·dR(j, i)  → DR2[j][i]   (product G_J·V_Iᵀ)
//   3. L = scale·X_J·X_Iᵀ (as the forward computes row j), P(i,j), P(j,i), and for both
//      entries P·dP (kept: A(i,j)·D(i,j) with A's part P/Z_i; pruned and fused: its share
//      α·P/Z_b of the match's row times D(b,j), α = ρ·H; weight_of in backward_tiles.cuh
//      forms those parts as one exponent where Z is tiny: docs/spec.md §3a), dL =
//      P·dP − P·s; then dS[j][i] = scale·(dL(i,j) + dL(j,i)) and the shares of A that
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
// a factor of about 10. D, L, P and every sum stay in fp32.
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
  const A eps = static_cast<A>(kCosineEps);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  for (int q = warp; q < J.rows; q += kWarps) {
    const int b = own.match(q);
    A norm2 = A(0), cross = A(0);
    for (int64_t f = lane; f < dim; f += 32) {
      const A xq = to_acc(x(J.r0 + q, f));
      norm2 = fma_acc(xq, xq, norm2);
      cross = fma_acc(xq, to_acc(x(J.r0 + b, f)), cross);
    }
    norm2 = warp_sum(norm2);
    cross = warp_sum(cross);
    if (lane == 0) {
      own.norm2(q) = norm2;
      own.cross(q) = cross;
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
      const int b = own.match(i);
      const A grad = own.grad_rho(i);
      if (b == i || !(own.rho(i) > A(0)) || grad == A(0) || (i != q && b != q)) continue;
      const A norm_i = sqrt_acc(own.norm2(i)), norm_b = sqrt_acc(own.norm2(b));
      const A prod = norm_i * norm_b;
      // i == q: the derivative in x_i, partner x_b; else q = b(i), partner x_i.
      const int partner = i == q ? b : i;
      const A norm_q = i == q ? norm_i : norm_b;
      const A x_partner = to_acc(x(J.r0 + partner, f));
      if (prod >= eps) {
        const A cos = own.cross(i) / prod;
        sum += grad * (x_partner / prod - cos * xq / (norm_q * norm_q));
      } else {
        sum += grad * x_partner / eps;
      }
    }
    grad_x[(J.r0 + q) * dim + f] += sum;
  }
}

// Everything a tile (J, I) reads in shared memory, at the plan's constant offsets.
template <typename T>
struct GradTile {
  using A = acc_t<T>;
  using S = staged_t<T>;
  using Plan = BackwardPlan<T>;
  unsigned char* base;
  // [j][i]: D(i, j) in pass A, then D(j, i) in pass B (D = Z·dR).
  __device__ A* dr() const { return reinterpret_cast<A*>(base + Plan::g_dr); }
  // Step 4's operand slices (pitch ds_pitch), over dr (dead by then).
  __device__ S* transposed() const { return reinterpret_cast<S*>(base + Plan::g_dr); }
  __device__ S* ds() const { return reinterpret_cast<S*>(base + Plan::g_ds); }  // [j][i]: dS(j, i)
  // [j][i]: the kept share of A(i, j); [j][k_I + i]: its fused share.
  __device__ S* w() const { return reinterpret_cast<S*>(base + Plan::g_w); }
  __device__ S* slice_a() const { return reinterpret_cast<S*>(base + Plan::g_slice_a); }
  __device__ S* slice_b() const { return reinterpret_cast<S*>(base + Plan::g_slice_b); }
  __device__ uint64_t* mask_ij() const { return reinterpret_cast<uint64_t*>(base + Plan::g_masks); }  // rows I, columns J
  __device__ uint64_t* mask_ji() const { return mask_ij() + kGradStrip; }  // rows J, columns I
  __device__ StripRows<A> own() const { return {base + Plan::g_rows_j}; }    // J
  __device__ StripRows<A> other() const { return {base + Plan::g_rows_i}; }  // I
};

// Pass A, entry (i, j) of every (j, i) this thread holds: dL(i, j) into dS (scaled), and
// the shares of A(i, j) that reach V_J into W. Reads D(i, ·) from t.dr().
template <typename T>
__device__ void row_side(StripAcc<acc_t<T>>& logits, const GradTile<T>& t,
                         const GradStrip& J, const GradStrip& I, int32_t depth_i, const Chunks& ch, acc_t<T> scale,
                         bool fuse) {
  using A = acc_t<T>;
  using S = staged_t<T>;
  using Plan = BackwardPlan<T>;
  const int32_t tp = Plan::tile_pitch;
  const StripRows<A> rows = t.other();
  for_each_entry(logits, [&](int j, int i, int, A& logit) {
    if (i >= depth_i) return;  // W's second half starts at k_I
    A grad_score = A(0), kept_share = A(0), fused_share = A(0);
    if (j < J.rows && i < I.rows) {
      const A x = at_most_zero(scale * logit - rows.lse(i));
      const A prob = exp_acc(x);
      const uint64_t wi = t.mask_ij()[i];
      A p_dp = A(0);  // P(i, j)·dP(i, j)
      if (bit_of(wi, j)) {
        kept_share = weight_of(rows, i, i, x, prob, false, A(1));
        p_dp = kept_share * t.dr()[j * tp + i];
      } else if (rows.fuses(i, fuse)) {
        const int b = rows.match(i);
        const uint64_t wb = t.mask_ij()[b];
        if (bit_of(wb, j)) {
          fused_share = weight_of(rows, i, b, x, prob, true, pattern_similarity<A>(wi, wb, j, ch.omega, J.rows));
          p_dp = fused_share * t.dr()[j * tp + b];
        }
      }
      grad_score = scale * (p_dp - prob * rows.dot_p(i));
    }
    t.ds()[j * Plan::ds_pitch + i] = from_acc<S>(grad_score);
    t.w()[j * Plan::w_pitch + i] = from_acc<S>(kept_share);
    t.w()[j * Plan::w_pitch + depth_i + i] = from_acc<S>(fused_share);
  });
}

// Pass B, entry (j, i): dS(j, i) += scale·dL(j, i). Reads D(j, ·) from t.dr().
template <typename T>
__device__ void column_side(StripAcc<acc_t<T>>& logits, const GradTile<T>& t,
                            const GradStrip& J, const GradStrip& I, const Chunks& ch, acc_t<T> scale, bool fuse) {
  using A = acc_t<T>;
  using S = staged_t<T>;
  using Plan = BackwardPlan<T>;
  const int32_t tp = Plan::tile_pitch;
  const StripRows<A> rows = t.own();
  for_each_entry(logits, [&](int j, int i, int, A& logit) {
    if (j >= J.rows || i >= I.rows) return;
    const A x = at_most_zero(scale * logit - rows.lse(j));
    const A prob = exp_acc(x);
    const uint64_t wj = t.mask_ji()[j];
    A p_dp = A(0);  // P(j, i)·dP(j, i)
    if (bit_of(wj, i)) {
      p_dp = weight_of(rows, j, j, x, prob, false, A(1)) * t.dr()[j * tp + i];
    } else if (rows.fuses(j, fuse)) {
      const int b = rows.match(j);
      const uint64_t wb = t.mask_ji()[b];
      if (bit_of(wb, i))
        p_dp = weight_of(rows, j, b, x, prob, true, pattern_similarity<A>(wj, wb, i, ch.omega, I.rows)) *
               t.dr()[b * tp + i];
    }
    S& ds = t.ds()[j * Plan::ds_pitch + i];
    ds = from_acc<S>(to_acc(ds) + scale * (p_dp - prob * rows.dot_p(j)));
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kBackwardBlocksPerSm)
    gradients_kernel(BackwardParams bp, const void* row_stats, void* grad_qk_acc,
                     void* grad_v_acc) {
  using A = acc_t<T>;
  using Plan = BackwardPlan<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const GradTile<T> t{smem};
  const Chunks ch(bp.p.seqlen, bp.p.block_size);
  const GradStrips strips(ch);
  const GradStrip J = strips.at(ch, static_cast<int32_t>(blockIdx.x));
  const int64_t n = ch.n, D = bp.p.head_dim, Dv = bp.p.value_dim;
  const A scale = static_cast<A>(bp.p.scale);
  const bool fuse = bp.p.fuse;
  const int32_t tp = Plan::tile_pitch;
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
    load_strip_rows<A>(t.own(), bp, row0, J, stats, stat_stride);

    for (int32_t s = 0; s < strips.count; ++s) {
      const GradStrip I = strips.at(ch, s);
      const int32_t depth_i = static_cast<int32_t>(padded_depth<T>(I.rows));  // k_I
      __syncthreads();  // the previous tile is done with the rows, masks and tiles
      load_strip_rows<A>(t.other(), bp, row0, I, stats, stat_stride);
      load_tile_mask(t.mask_ij(), words, ch, I, J);
      load_tile_mask(t.mask_ji(), words, ch, J, I);
      __syncthreads();  // rows and masks are loaded (the products below may run no slice: Dv = 0)
      StripAcc<A> acc;

      // Step 1, then pass A of step 3 (the logits' product ends with barriers: D ≥ 1).
      strip_product<T>(acc, {v, J.r0, J.rows}, {g, I.r0, I.rows}, Dv, t.slice_a(), t.slice_b());
      for_each_entry(acc, [&](int j, int i, int, A& value) {
        const bool kept = j < J.rows && i < I.rows && bit_of(t.mask_ij()[i], j);
        t.dr()[j * tp + i] = kept ? value - t.other().delta(i) : A(0);
      });
      strip_product<T>(acc, {x, J.r0, J.rows}, {x, I.r0, I.rows}, D, t.slice_a(), t.slice_b());
      row_side<T>(acc, t, J, I, depth_i, ch, scale, fuse);

      // Step 2 over step 1's tile, then pass B with the logits recomputed (identical).
      __syncthreads();  // pass A is done with D(i, j)
      strip_product<T>(acc, {g, J.r0, J.rows}, {v, I.r0, I.rows}, Dv, t.slice_a(), t.slice_b());
      for_each_entry(acc, [&](int j, int i, int, A& value) {
        const bool kept = j < J.rows && i < I.rows && bit_of(t.mask_ji()[j], i);
        t.dr()[j * tp + i] = kept ? value - t.own().delta(j) : A(0);
      });
      strip_product<T>(acc, {x, J.r0, J.rows}, {x, I.r0, I.rows}, D, t.slice_a(), t.slice_b());
      column_side<T>(acc, t, J, I, ch, scale, fuse);

      // Step 4: dX_J += dS·X_I, then dV_J += W·[G_I; G_b(I)], 64 features at a time, the
      // operand rows staged transposed over the dead dR tile.
      const auto strip_row = [&](int k) { return k < I.rows ? I.r0 + k : int64_t{-1}; };
      const auto match_row = [&](int k) { return k < I.rows ? I.r0 + t.other().match(k) : int64_t{-1}; };
      for (int64_t f0 = 0; f0 < D; f0 += kGradStrip) {
        const int32_t width = static_cast<int32_t>(lesser<int64_t>(kGradStrip, D - f0));
        __syncthreads();  // dS complete; dR (or the previous slice) no longer read
        stage_transposed<T>(t.transposed(), Plan::ds_pitch, x, strip_row, f0, depth_i, D);
        __syncthreads();
        staged_product<T>(acc, false, t.ds(), Plan::ds_pitch, J.rows, t.transposed(), Plan::ds_pitch, width, depth_i);
        add_to_rows(acc, grad_x + J.r0 * D + f0, D, J.rows, width);
      }
      for (int64_t f0 = 0; f0 < Dv; f0 += kGradStrip) {
        const int32_t width = static_cast<int32_t>(lesser<int64_t>(kGradStrip, Dv - f0));
        __syncthreads();
        stage_transposed<T>(t.transposed(), Plan::ds_pitch, g, strip_row, f0, depth_i, Dv);
        __syncthreads();
        staged_product<T>(acc, false, t.w(), Plan::w_pitch, J.rows, t.transposed(), Plan::ds_pitch, width, depth_i);
        if (fuse) {
          __syncthreads();
          stage_transposed<T>(t.transposed(), Plan::ds_pitch, g, match_row, f0, depth_i, Dv);
          __syncthreads();
          staged_product<T>(acc, true, t.w() + depth_i, Plan::w_pitch, J.rows, t.transposed(), Plan::ds_pitch, width,
                            depth_i);
        }
        add_to_rows(acc, grad_v + J.r0 * Dv + f0, Dv, J.rows, width);
      }
    }
    if (fuse) add_cosine_terms<T>(t.own(), x, J, ch, D, grad_x);
  }
}

}  // namespace bspf::cuda
