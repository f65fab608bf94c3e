// Geometry and shared-memory layout of the fused forward (forward.cuh). Host and device
// run the same code, so the launch size and the kernel's pointers always agree.
//
// A CTA owns a strip of whole chunks (at most 64 rows, so every fusion source and target
// is in it) of one (b, h) and keeps the strip's logits against all N columns in shared
// memory: they are computed once and read by the row statistics, the scores, the fusion
// and A·V. The strip shrinks (fewer chunks, fewer selection warps) until the layout fits
// the device's shared memory; N beyond what one chunk fits is refused (api.cu).
#pragma once

#include "common.cuh"
#include "selection.cuh"
#include "warp_gemm.cuh"

namespace bspf::cuda {

constexpr int32_t kStripRows = 64;  // at most, and one value slice / column tile is 64 wide

struct ForwardPlan {
  int32_t strip_chunks = 1;  // chunks per CTA
  int32_t strips = 1;        // CTAs per (b, h)
  int32_t rows_pad = 16;     // strip rows rounded up to the 16 of an mma tile
  int32_t cols_pad = 16;     // N rounded up to 16
  int32_t logit_pitch = 16;  // elements per logits row
  int32_t depth = 16;        // D, padded for the tensor cores
  int32_t x_pitch = 16;      // elements per staged X row
  int32_t v_pitch = 16;      // elements per staged Vᵀ row (a value column over 64 tokens)
  int32_t select_warps = 1;  // warps that decide blocks at once (one key buffer each)
  // Byte offsets into dynamic shared memory.
  size_t logits = 0, strip_x = 0, scratch = 0, words = 0, lse = 0, rho = 0, log_z = 0, inv_z = 0, norm = 0, match = 0;
  size_t bytes = 0;

  template <typename T>
  __host__ __device__ static ForwardPlan make(const Problem& p, int32_t strip_chunks, int32_t select_warps) {
    using A = acc_t<T>;
    using S = staged_t<T>;
    using Key = typename KeyOf<A>::type;
    const Chunks ch(p.seqlen, p.block_size);
    constexpr bool half = IsHalf<T>::value;
    ForwardPlan f;
    f.strip_chunks = strip_chunks;
    f.strips = (ch.count + strip_chunks - 1) / strip_chunks;
    f.select_warps = select_warps;
    const int32_t rows = strip_chunks * ch.omega;
    f.rows_pad = (rows + 15) / 16 * 16;
    f.cols_pad = static_cast<int32_t>((p.seqlen + 15) / 16 * 16);
    f.logit_pitch = f.cols_pad + 4;  // rows start on different banks
    f.depth = static_cast<int32_t>(padded_depth<T>(p.head_dim));
    // Half pitches stay even (4-byte operand pairs) and off a multiple of 32 words;
    // float pitches are odd so that the eight rows an FMA tile reads hit eight banks.
    f.x_pitch = f.depth + (half ? 8 : 1);
    f.v_pitch = kStripRows + (half ? 8 : 1);
    const size_t block = static_cast<size_t>(ch.omega) * ch.omega;
    const size_t scratch = max3(static_cast<size_t>(kStripRows) * f.x_pitch * sizeof(S),
                                static_cast<size_t>(kStripRows) * f.v_pitch * sizeof(S),
                                block * select_warps * sizeof(Key));
    SmemPlan plan;
    f.logits = plan.take(static_cast<size_t>(f.rows_pad) * f.logit_pitch, sizeof(A));
    f.strip_x = plan.take(static_cast<size_t>(f.rows_pad) * f.x_pitch, sizeof(S));
    f.scratch = plan.take(scratch, 1);
    f.words = plan.take(static_cast<size_t>(rows) * ch.count, sizeof(uint64_t));
    f.lse = plan.take(f.rows_pad, sizeof(A));
    f.rho = plan.take(f.rows_pad, sizeof(A));
    f.log_z = plan.take(f.rows_pad, sizeof(A));
    f.inv_z = plan.take(f.rows_pad, sizeof(A));
    f.norm = plan.take(f.rows_pad, sizeof(A));
    f.match = plan.take(f.rows_pad, sizeof(int32_t));
    f.bytes = plan.bytes;
    return f;
  }

  // The largest strip, then the most selection warps, that fits `limit` bytes; the
  // smallest layout (more than `limit`) when none does.
  template <typename T>
  static ForwardPlan choose(const Problem& p, size_t limit) {
    const int32_t chunks_total = static_cast<int32_t>((p.seqlen + p.block_size - 1) / p.block_size);
    const int32_t most = lesser(kStripRows / p.block_size, chunks_total > 0 ? chunks_total : 1);
    for (int32_t chunks = most; chunks >= 1; --chunks)
      for (int32_t warps = kWarps; warps >= 1; --warps) {
        const ForwardPlan f = make<T>(p, chunks, warps);
        if (f.bytes <= limit) return f;
      }
    return make<T>(p, 1, 1);
  }

 private:
  __host__ __device__ static size_t max3(size_t a, size_t b, size_t c) {
    const size_t ab = a > b ? a : b;
    return ab > c ? ab : c;
  }
};

}  // namespace bspf::cuda
