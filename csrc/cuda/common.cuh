// Building blocks shared by the BSPF CUDA kernels: element types, strided row views,
// the tiled X·Yᵀ product every kernel uses for logits and dA, warp/CTA reductions and
// the shared-memory planner. No torch anywhere.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "bspf/params.h"

namespace bspf::cuda {

// One CTA shape for every kernel: 4 warps. A tile is at most 64×64 (Ω ≤ 64, so a chunk
// is at most one tile high); the contraction dimension is staged 16 at a time.
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;
constexpr int kDepth = 16;
constexpr int kTilePad = kTile + 1;  // staged operands are stored k-major, padded
constexpr int kPerThread = kTile * kTile / kThreads;
constexpr int kSlice = 32;  // feature columns staged at once when accumulating gradients

// ----------------------------------------------------------------------------- types

// Accumulation type: double for float64 inputs, float otherwise (matches params.h).
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float sqrt_acc(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_acc(double x) { return sqrt(x); }
template <typename A> __device__ __forceinline__ A neg_inf() { return -static_cast<A>(INFINITY); }
// min(x, 0) that keeps a NaN (fmin would return 0): log P = L − lse capped at 0, as on the CPU.
template <typename A> __device__ __forceinline__ A at_most_zero(A x) { return x > A(0) ? A(0) : x; }

// std::min is host-only without --expt-relaxed-constexpr.
template <typename I>
__host__ __device__ __forceinline__ constexpr I lesser(I a, I b) {
  return b < a ? b : a;
}

// The smallest row sum Z_i of R that the linear form (P = exp(L − lse), Z = Σ R, A = R / Z)
// gets right: what it loses is the terms of R below the smallest normal number (2^-126 in
// float, 2^-1022 in double), less than that each, and a row has fewer than 64·N < 2^26
// terms (N < 2^20), so under 2^-100 (float) or 2^-996 (double) in all: below 2^-40 (float)
// and 2^-96 (double) of Z_i at this floor. Rows with a smaller Z_i (extreme logits,
// docs/spec.md §3a) are evaluated in log space.
template <typename A> struct LinearFloor;
template <> struct LinearFloor<float> {
  static constexpr float value = 0x1p-60f;
  static constexpr float log_value = -41.588830833596716f;  // −60·log 2
};
template <> struct LinearFloor<double> {
  static constexpr double value = 0x1p-900;
  static constexpr double log_value = -623.8324625039508;  // −900·log 2
};

// -------------------------------------------------------------------------- geometry

// Chunk geometry of one sequence (SPEC §3): chunk c is tokens [cΩ, min((c+1)Ω, N)).
struct Chunks {
  int64_t n;
  int32_t omega;
  int32_t count;
  __host__ __device__ Chunks(int64_t seqlen, int32_t block)
      : n(seqlen), omega(block), count(static_cast<int32_t>((seqlen + block - 1) / block)) {}
  __host__ __device__ int64_t begin(int64_t c) const { return c * omega; }
  __host__ __device__ int32_t size(int64_t c) const {
    const int64_t left = n - c * omega;
    return static_cast<int32_t>(left < omega ? left : omega);
  }
  // Tiles of whole chunks, at most kTile tokens: a token's match (same chunk) is then
  // always inside the token's tile.
  __host__ __device__ int32_t tile_span() const { return (kTile / omega) * omega; }
};

// (batch, head) pairs; params.h's Problem::pairs() is host-only.
__host__ __device__ __forceinline__ int64_t pair_count(const Problem& p) { return p.batch * p.heads; }

__device__ __forceinline__ uint64_t low_bits(int32_t n) { return n >= 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1; }
__device__ __forceinline__ bool bit_of(uint64_t word, int32_t bit) { return (word >> bit) & 1u; }

// Rows of one (batch, head) slice of a strided (B, H, N, D) tensor.
template <typename T>
struct Rows {
  const T* base;
  int64_t row_stride;
  int64_t col_stride;
  __device__ __forceinline__ T operator()(int64_t r, int64_t k) const { return base[r * row_stride + k * col_stride]; }
};

template <typename T>
__device__ __forceinline__ Rows<T> pair_rows(const void* data, const int64_t* stride, int64_t pair, int64_t heads) {
  const int64_t b = pair / heads, h = pair % heads;
  return Rows<T>{static_cast<const T*>(data) + b * stride[0] + h * stride[1], stride[2], stride[3]};
}

// -------------------------------------------------------------------- tile product

// out[i·ld + j] = alpha · Σ_k a(a0+i, k) · b(b0+j, k) for i < na, j < nb (both ≤ kTile).
// Each output sums k = 0, 1, … in order with fused multiply-adds, so an entry computed
// as (i, j) or as (j, i) is bitwise the same: logits are exactly symmetric in every kernel.
// sa and sb hold kDepth × kTilePad values each. Starts with a barrier (earlier readers of
// sa, sb and out are done) and ends without one: callers sync before reading out.
template <typename T, typename A>
__device__ void tile_product(Rows<T> a, int64_t a0, int32_t na, Rows<T> b, int64_t b0, int32_t nb, int64_t depth,
                             A alpha, A* sa, A* sb, A* out, int32_t ld) {
  __syncthreads();
  A acc[kPerThread];
#pragma unroll
  for (int t = 0; t < kPerThread; ++t) acc[t] = A(0);
  for (int64_t k0 = 0; k0 < depth; k0 += kDepth) {
    // Consecutive threads read consecutive k of one row: coalesced for row-major data.
    for (int e = threadIdx.x; e < kTile * kDepth; e += kThreads) {
      const int r = e / kDepth, kk = e % kDepth;
      const int64_t k = k0 + kk;
      const bool in_depth = k < depth;
      sa[kk * kTilePad + r] = (r < na && in_depth) ? to_acc(a(a0 + r, k)) : A(0);
      sb[kk * kTilePad + r] = (r < nb && in_depth) ? to_acc(b(b0 + r, k)) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kPerThread; ++t) {
      const int e = threadIdx.x + t * kThreads;
      const int i = e / kTile, j = e % kTile;
      if (i < na) {  // uniform across a warp: its 32 entries share i
#pragma unroll
        for (int kk = 0; kk < kDepth; ++kk) acc[t] = fma_acc(sa[kk * kTilePad + i], sb[kk * kTilePad + j], acc[t]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int t = 0; t < kPerThread; ++t) {
    const int e = threadIdx.x + t * kThreads;
    const int i = e / kTile, j = e % kTile;
    if (i < na && j < nb) out[i * ld + j] = alpha * acc[t];
  }
}

// ----------------------------------------------------------------------- reductions

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum of one int per thread over the CTA, returned to every thread. scratch: kWarps ints.
__device__ __forceinline__ int block_sum(int v, int* scratch) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  int total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();  // scratch is free again for the next call
  return total;
}

// -------------------------------------------------------------------- shared memory

// Lays out a kernel's dynamic shared memory; host and device run the same code so the
// launch size and the kernel's pointers always agree.
struct SmemPlan {
  size_t bytes = 0;
  __host__ __device__ size_t take(size_t count, size_t elem) {
    const size_t offset = (bytes + 15) & ~size_t{15};
    bytes = offset + count * elem;
    return offset;
  }
};

}  // namespace bspf::cuda
