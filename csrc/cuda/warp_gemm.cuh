// One warp's 16×8 tile of a product A·Bᵀ from shared memory, the unit every kernel
// builds its GEMMs from (logits X·Xᵀ, A·V, G·Vᵀ, ...).
//
// acc[r] += Σ_k A(row_r, k) · B(col_r, k), with (row_r, col_r) the entry accumulator
// register r of the lane holds in the mma.sync C layout (frag_row/frag_col, mma.cuh).
// Operands are read through loaders so that the kernels choose their own storage:
//   half types (fp16, bf16): tensor cores, mma.m16n8k16 with fp32 accumulation; the
//     loader gives packed pairs `pair(row, k)` = (A(row, k), A(row, k + 1)), k even;
//     `depth` is a multiple of 16 (the callers zero-pad).
//   float, double: the same entries with fused multiply-adds, k = 0, 1, ... in order, so
//     X·Yᵀ and Y·Xᵀ agree bitwise; the loader gives `at(row, k)`.
// Either way an entry of X·Xᵀ and its mirror are computed by the same arithmetic: the
// logits are exactly symmetric.
#pragma once

#include "common.cuh"
#include "mma.cuh"

namespace bspf::cuda {

// What shared memory holds for the products: the input type itself for the half types
// (tensor-core operands), the accumulation type otherwise.
template <typename T> struct StagedOf { using type = acc_t<T>; };
template <> struct StagedOf<__half> { using type = __half; };
template <> struct StagedOf<__nv_bfloat16> { using type = __nv_bfloat16; };
template <typename T> using staged_t = typename StagedOf<T>::type;

template <typename T> struct IsHalf { static constexpr bool value = false; };
template <> struct IsHalf<__half> { static constexpr bool value = true; };
template <> struct IsHalf<__nv_bfloat16> { static constexpr bool value = true; };

// Rounds depth up to what a product over it needs (16 for the tensor cores).
template <typename T>
__host__ __device__ constexpr int64_t padded_depth(int64_t depth) {
  return IsHalf<T>::value ? (depth + 15) / 16 * 16 : depth;
}

// Row-major staged operand: element (row, k) at p[row · ld + k]. ld is even for half types
// so that pairs are 4-byte aligned.
template <typename S>
struct SmemRows {
  const S* p;
  int32_t ld;
  __device__ __forceinline__ uint32_t pair(int row, int k) const {
#if defined(__CUDA_ARCH__)
    return *reinterpret_cast<const uint32_t*>(p + row * ld + k);
#else
    uint32_t v;
    memcpy(&v, p + row * ld + k, 4);
    return v;
#endif
  }
  __device__ __forceinline__ acc_t<S> at(int row, int k) const { return to_acc(p[row * ld + k]); }
};

// acc_t of the staged half types is float.
template <typename T, typename LoadA, typename LoadB>
__device__ __forceinline__ void warp_tile_16x8(acc_t<T> acc[4], const LoadA& a, const LoadB& b, int32_t depth) {
  const int lane = threadIdx.x & 31;
  if constexpr (IsHalf<T>::value) {
    const int g = lane >> 2, t2 = (lane & 3) << 1;
    for (int k0 = 0; k0 < depth; k0 += 16) {
      const uint32_t af[4] = {a.pair(g, k0 + t2), a.pair(g + 8, k0 + t2), a.pair(g, k0 + t2 + 8),
                              a.pair(g + 8, k0 + t2 + 8)};
      const uint32_t bf[2] = {b.pair(g, k0 + t2), b.pair(g, k0 + t2 + 8)};
      mma_m16n8k16<T>(acc, af, bf, acc);
    }
  } else {
    const int r0 = frag_row(lane, 0), r1 = frag_row(lane, 2);
    const int c0 = frag_col(lane, 0), c1 = frag_col(lane, 1);
    for (int k = 0; k < depth; ++k) {
      const acc_t<T> a0 = a.at(r0, k), a1 = a.at(r1, k), b0 = b.at(c0, k), b1 = b.at(c1, k);
      acc[0] = fma_acc(a0, b0, acc[0]);
      acc[1] = fma_acc(a0, b1, acc[1]);
      acc[2] = fma_acc(a1, b0, acc[2]);
      acc[3] = fma_acc(a1, b1, acc[3]);
    }
  }
}

}  // namespace bspf::cuda
