// Tensor-core fragments: the one place that knows the mma.sync m16n8k16 register layouts.
//
// D (16×8, fp32) += A (16×16, row-major) · B (16×8, column-major), A and B in fp16 or
// bf16, one warp. On the device the product is one `mma.sync.aligned.m16n8k16` (sm_80+).
// On the host (tools/cuda_emulation runs these sources on the CPU) the same layouts are
// implemented from the PTX ISA's fragment tables ("Matrix Fragments for mma.m16n8k16 with
// floating point type"): each lane publishes its registers to its emulated warp, and every
// lane computes the entries of D it holds in fp32, k in increasing order.
//
// Layouts (groupID g = lane >> 2, t = lane & 3), element pairs packed low half first:
//   A: a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..2t+1]
//      a[2] = A[g][2t+8..+9]   a[3] = A[g+8][2t+8..+9]
//   B: b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..+9][g]
//   C, D: c[0], c[1] = C[g][2t], C[g][2t+1];  c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#if !defined(__CUDA_ARCH__) && defined(BSPF_CUDA_EMULATION)
#include "emulated_warp.h"  // tools/cuda_emulation: the warp a host "lane" belongs to
#endif

namespace bspf::cuda {

// Row and column inside the 16×8 C tile of accumulator register r (0..3) of `lane`.
__host__ __device__ __forceinline__ int frag_row(int lane, int r) { return (lane >> 2) + ((r >> 1) << 3); }
__host__ __device__ __forceinline__ int frag_col(int lane, int r) { return ((lane & 3) << 1) + (r & 1); }

// Two 16-bit values as one register, `lo` in the low half (the element with the smaller
// k or column index).
template <typename H>
__host__ __device__ __forceinline__ uint32_t pack2(H lo, H hi) {
  uint16_t l, h;
  memcpy(&l, &lo, 2);
  memcpy(&h, &hi, 2);
  return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
}

#if !defined(__CUDA_ARCH__) && defined(BSPF_CUDA_EMULATION)
namespace mma_host {

inline float to_float(__half h) { return __half2float(h); }
inline float to_float(__nv_bfloat16 h) { return __bfloat162float(h); }

template <typename H>
inline float half_of(uint32_t reg, int which) {
  const uint16_t bits = static_cast<uint16_t>(which ? reg >> 16 : reg & 0xFFFFu);
  H h;
  memcpy(&h, &bits, 2);
  return to_float(h);
}

// A[row][k] held by the warp, per the table above.
template <typename H>
inline float a_elem(const uint32_t (*a)[4], int row, int k) {
  const int g = row & 7, t = (k & 7) >> 1;
  const int reg = ((row >> 3) & 1) + ((k >> 3) << 1);
  return half_of<H>(a[g * 4 + t][reg], k & 1);
}

template <typename H>
inline float b_elem(const uint32_t (*b)[2], int k, int col) {
  const int t = (k & 7) >> 1;
  return half_of<H>(b[col * 4 + t][k >> 3], k & 1);
}

struct Operands {
  uint32_t a[4];
  uint32_t b[2];
};

template <typename H>
inline void mma(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  Operands mine;
  memcpy(mine.a, a, sizeof(mine.a));
  memcpy(mine.b, b, sizeof(mine.b));
  Operands all[32];
  bspf_emulation::warp_exchange(&mine, all, sizeof(Operands));
  uint32_t as[32][4], bs[32][2];
  for (int l = 0; l < 32; ++l) {
    memcpy(as[l], all[l].a, sizeof(as[l]));
    memcpy(bs[l], all[l].b, sizeof(bs[l]));
  }
  const int lane = bspf_emulation::lane_id();
  for (int r = 0; r < 4; ++r) {
    const int row = frag_row(lane, r), col = frag_col(lane, r);
    float acc = c[r];
    // Products of two halves are exact in fp32; the sum runs k = 0, 1, ... so that an
    // entry of X·Yᵀ and its mirror in Y·Xᵀ are computed identically.
    for (int k = 0; k < 16; ++k) acc = fmaf(a_elem<H>(as, row, k), b_elem<H>(bs, k, col), acc);
    d[r] = acc;
  }
}

}  // namespace mma_host
#endif

// d = a·b + c for one warp (all 32 lanes must call it together).
template <typename H>
__device__ __forceinline__ void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                             const float c[4]);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                     const float c[4]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#elif defined(BSPF_CUDA_EMULATION)
  mma_host::mma<__half>(d, a, b, c);
#endif
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                            const float c[4]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#elif defined(BSPF_CUDA_EMULATION)
  mma_host::mma<__nv_bfloat16>(d, a, b, c);
#endif
}

}  // namespace bspf::cuda
