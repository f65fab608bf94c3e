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
constexpr int kBackwardBlocksPerSm = 1;

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

// The layout depends on the dtype only, so every buffer is the shared base plus a
// compile-time offset: no pointers live in registers.
template <typename T>
struct BackwardPlan {
  using A = acc_t<T>;
  using S = staged_t<T>;
  static constexpr bool kHalf = IsHalf<T>::value;
  // Half pitches stay even (4-byte operand pairs) and off a multiple of 32 words; float
  // pitches are odd so that the eight rows an FMA tile reads hit eight banks.
  static constexpr int32_t slice = kHalf ? 64 : (sizeof(A) == 4 ? 32 : 8);  // features staged at once
  static constexpr int32_t slice_pitch = slice + (kHalf ? 8 : 1);  // per row of a staged slice
  static constexpr int32_t tile_pitch = kGradStrip + (kHalf ? 4 : 1);  // per row of an A-typed 64×64 tile
  static constexpr int32_t ds_pitch = kGradStrip + (kHalf ? 8 : 1);  // dS, and step 4's transposed slices
  static constexpr int32_t w_pitch = 2 * kGradStrip + (kHalf ? 8 : 1);  // W: kept shares, then fused shares

  // Per-row values kept for one strip, kGradStrip each (StripRows).
  static constexpr int kRowValues = 10;  // lse, inv_z, delta, dot_p, rho, grad_rho, norm2, cross, log_z, log_rho
  static constexpr size_t kSliceBytes = size_t{kGradStrip} * slice_pitch * sizeof(S);
  static constexpr size_t kTileBytes = size_t{kGradStrip} * tile_pitch * sizeof(A);
  static constexpr size_t kTransposedBytes = size_t{kGradStrip} * ds_pitch * sizeof(S);
  static constexpr size_t kRowBytes = kRowValues * kGradStrip * sizeof(A) + kGradStrip * sizeof(int32_t);
  static constexpr size_t after(size_t offset, size_t bytes) { return (offset + bytes + 15) / 16 * 16; }
  static constexpr size_t larger(size_t a, size_t b) { return a > b ? a : b; }

  // Row statistics kernel (byte offsets): two slices, dA of the tile, the tile mask, the
  // strip's rows, the four row sums.
  static constexpr size_t r_slice_a = 0;
  static constexpr size_t r_slice_b = after(r_slice_a, kSliceBytes);
  static constexpr size_t r_grads = after(r_slice_b, kSliceBytes);
  static constexpr size_t r_mask = after(r_grads, kTileBytes);
  static constexpr size_t r_rows = after(r_mask, kGradStrip * sizeof(uint64_t));
  static constexpr size_t r_sums = after(r_rows, kRowBytes);
  static constexpr size_t r_bytes = after(r_sums, 4 * kGradStrip * sizeof(A));

  // Gradients kernel: the dR tile (aliased by step 4's transposed slices), dS, W, two
  // slices, the two tile masks, the rows of both strips.
  static constexpr size_t g_dr = 0;
  static constexpr size_t g_ds = after(g_dr, larger(kTileBytes, kTransposedBytes));
  static constexpr size_t g_w = after(g_ds, size_t{kGradStrip} * ds_pitch * sizeof(S));
  static constexpr size_t g_slice_a = after(g_w, size_t{kGradStrip} * w_pitch * sizeof(S));
  static constexpr size_t g_slice_b = after(g_slice_a, kSliceBytes);
  static constexpr size_t g_masks = after(g_slice_b, kSliceBytes);
  static constexpr size_t g_rows_j = after(g_masks, 2 * kGradStrip * sizeof(uint64_t));
  static constexpr size_t g_rows_i = after(g_rows_j, kRowBytes);
  static constexpr size_t g_bytes = after(g_rows_i, kRowBytes);

  static constexpr size_t bytes = larger(r_bytes, g_bytes);
};

// The per-row values of one strip in shared memory (BackwardPlan::kRowValues of them, then
// the matches), strip-local indices.
template <typename A>
struct StripRows {
  unsigned char* base;
  __device__ A& value(int which, int i) const { return reinterpret_cast<A*>(base)[which * kGradStrip + i]; }
  __device__ A& lse(int i) const { return value(0, i); }
  // 1/Z_i, or 0 when Z_i is below LinearFloor: that row's shares are formed in log space.
  __device__ A& inv_z(int i) const { return value(1, i); }
  __device__ A& delta(int i) const { return value(2, i); }
  __device__ A& dot_p(int i) const { return value(3, i); }
  __device__ A& rho(int i) const { return value(4, i); }
  __device__ A& grad_rho(int i) const { return value(5, i); }
  __device__ A& norm2(int i) const { return value(6, i); }
  __device__ A& cross(int i) const { return value(7, i); }
  __device__ A& log_z(int i) const { return value(8, i); }
  __device__ A& log_rho(int i) const { return value(9, i); }  // log ρ_i (0 where ρ_i = 0)
  // b(i), strip-local; i itself when i has no match.
  __device__ int32_t& match(int i) const { return reinterpret_cast<int32_t*>(base + 10 * kGradStrip * sizeof(A))[i]; }
  // Whether row i moves pruned probability to its match (SPEC §3.7): it has one and ρ_i > 0.
  __device__ bool fuses(int i, bool fuse) const { return fuse && match(i) != i && rho(i) > A(0); }
};

}  // namespace bspf::cuda
