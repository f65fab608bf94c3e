// Geometry and shared-memory layout of the backward (backward.cuh). Host and device run
// the same code, so the launch size and the kernels' pointers always agree.
//
// Both kernels work on strips of whole chunks, at most 64 tokens (so a token's match,
// which is in its chunk, is in its strip), and on 64×64 tiles between two strips. Every
// operand of a product is staged in depth slices of `slice` features, so no buffer grows
// with N, D or Dv: the backward has no N limit, and its need is fixed per dtype.
#pragma once

#include "common.cuh"
#include "warp_gemm.cuh"

namespace bspf::cuda {

constexpr int32_t kGradStrip = 64;  // tokens per strip at most; tiles are kGradStrip²
// CTAs per SM the kernels are compiled for: 4 × 128 threads caps a thread at 128 registers.
constexpr int kBackwardBlocksPerSm = 4;

// Strips of whole chunks: strip s is chunks [s·per, (s+1)·per).
struct GradStrip {
  int32_t first_chunk, last_chunk;  // [first, last)
  int64_t r0;                       // first token
  int32_t rows;                     // tokens in the strip
};

struct GradStrips {
  int32_t per;    // chunks per strip
  int32_t count;  // strips per sequence
  __host__ __device__ explicit GradStrips(const Chunks& ch)
      : per(kGradStrip / ch.omega), count((ch.count + kGradStrip / ch.omega - 1) / (kGradStrip / ch.omega)) {}
  __host__ __device__ GradStrip at(const Chunks& ch, int32_t s) const {
    GradStrip g;
    g.first_chunk = s * per;
    g.last_chunk = lesser<int32_t>(ch.count, g.first_chunk + per);
    g.r0 = ch.begin(g.first_chunk);
    g.rows = static_cast<int32_t>(lesser<int64_t>(ch.n, ch.begin(g.last_chunk)) - g.r0);
    return g;
  }
};

struct BackwardPlan {
  int32_t slice = 16;        // features staged at once for the row products
  int32_t slice_pitch = 16;  // staged elements per row of a slice
  int32_t tile_pitch = 64;   // accumulation-type elements per row of a 64×64 tile
  int32_t ds_pitch = 64;     // staged elements per row of dS
  int32_t w_pitch = 128;     // staged elements per row of W (kept shares, then fused shares) and of
                             // the transposed operand slices of dX and dV
  // Row statistics kernel (byte offsets).
  size_t r_slice_a = 0, r_slice_b = 0, r_grads = 0, r_mask = 0, r_rows = 0, r_sums = 0, r_bytes = 0;
  // Gradients kernel: dR tiles (aliased by the transposed slices of the last step), dS, W,
  // the row slices, the two tile masks, the rows of both strips.
  size_t g_dr = 0, g_ds = 0, g_w = 0, g_slice_a = 0, g_slice_b = 0, g_masks = 0, g_rows_j = 0, g_rows_i = 0,
         g_bytes = 0;

  // Per-row values kept in shared memory for one strip (kGradStrip each).
  static constexpr int kRowValues = 9;  // lse, z, delta, dot_p, rho, grad_rho, norm2, cross, spare

  template <typename T>
  __host__ __device__ static BackwardPlan make() {
    using A = acc_t<T>;
    using S = staged_t<T>;
    constexpr bool half = IsHalf<T>::value;
    BackwardPlan b;
    // Half pitches stay even (4-byte operand pairs) and off a multiple of 32 words; float
    // pitches are odd so that the eight rows an FMA tile reads hit eight banks.
    b.slice = half ? 64 : (sizeof(A) == 4 ? 32 : 8);
    b.slice_pitch = b.slice + (half ? 8 : 1);
    b.tile_pitch = kGradStrip + (half ? 4 : 1);
    b.ds_pitch = kGradStrip + (half ? 8 : 1);
    b.w_pitch = 2 * kGradStrip + (half ? 8 : 1);
    const size_t slice_bytes = static_cast<size_t>(kGradStrip) * b.slice_pitch * sizeof(S);
    const size_t tile_bytes = static_cast<size_t>(kGradStrip) * b.tile_pitch * sizeof(A);
    const size_t row_bytes = kRowValues * kGradStrip * sizeof(A) + kGradStrip * sizeof(int32_t);

    SmemPlan r;
    b.r_slice_a = r.take(slice_bytes, 1);
    b.r_slice_b = r.take(slice_bytes, 1);
    b.r_grads = r.take(tile_bytes, 1);
    b.r_mask = r.take(kGradStrip, sizeof(uint64_t));
    b.r_rows = r.take(row_bytes, 1);
    b.r_sums = r.take(4 * kGradStrip, sizeof(A));
    b.r_bytes = r.bytes;

    SmemPlan g;
    const size_t transposed = static_cast<size_t>(kGradStrip) * b.w_pitch * sizeof(S);
    b.g_dr = g.take(2 * tile_bytes > transposed ? 2 * tile_bytes : transposed, 1);
    b.g_ds = g.take(static_cast<size_t>(kGradStrip) * b.ds_pitch, sizeof(S));
    b.g_w = g.take(static_cast<size_t>(kGradStrip) * b.w_pitch, sizeof(S));
    b.g_slice_a = g.take(slice_bytes, 1);
    b.g_slice_b = g.take(slice_bytes, 1);
    b.g_masks = g.take(2 * kGradStrip, sizeof(uint64_t));
    b.g_rows_j = g.take(row_bytes, 1);
    b.g_rows_i = g.take(row_bytes, 1);
    b.g_bytes = g.bytes;
    return b;
  }

  __host__ __device__ size_t bytes() const { return r_bytes > g_bytes ? r_bytes : g_bytes; }
};

// The per-row values of one strip in shared memory (see kRowValues), strip-local indices.
template <typename A>
struct StripRows {
  A *lse, *z, *delta, *dot_p, *rho, *grad_rho, *norm2, *cross;
  int32_t* match;  // strip-local b(i); i itself when i fuses nothing
  __device__ explicit StripRows(unsigned char* base) {
    A* a = reinterpret_cast<A*>(base);
    lse = a;
    z = a + kGradStrip;
    delta = a + 2 * kGradStrip;
    dot_p = a + 3 * kGradStrip;
    rho = a + 4 * kGradStrip;
    grad_rho = a + 5 * kGradStrip;
    norm2 = a + 6 * kGradStrip;
    cross = a + 7 * kGradStrip;
    match = reinterpret_cast<int32_t*>(a + BackwardPlan::kRowValues * kGradStrip);
  }
  // Whether row i moves pruned probability to its match (SPEC §3.7): it has one and ρ_i > 0.
  __device__ bool fuses(int i, bool fuse) const { return fuse && match[i] != i && rho[i] > A(0); }
};

}  // namespace bspf::cuda
