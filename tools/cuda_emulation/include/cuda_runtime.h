// Host-side stand-ins for the CUDA features the bspf kernels use, so the kernel sources
// compile as plain C++ and run one std::thread per CUDA thread (see emulate.cpp).
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__
#define __align__(x)  // the heap block behind smem is 16-byte aligned
// The kernels' `extern __shared__ unsigned char smem[]` becomes a pointer to an exactly
// sized heap block, so AddressSanitizer sees out-of-bounds shared-memory accesses.
#define smem (*emu_smem)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx, gridDim, blockDim;

struct EmuCta {
  std::barrier<>* all;
  std::barrier<>* warps[32];
  unsigned long long slots[32][32];
};
inline thread_local EmuCta* emu_cta = nullptr;

inline void __syncthreads() { emu_cta->all->arrive_and_wait(); }

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int offset) {
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
  std::memcpy(&emu_cta->slots[w][l], &v, sizeof(V));
  emu_cta->warps[w]->arrive_and_wait();
  V r;
  std::memcpy(&r, &emu_cta->slots[w][l ^ offset], sizeof(V));
  emu_cta->warps[w]->arrive_and_wait();
  return r;
}

inline unsigned __ballot_sync(unsigned, int pred) {
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
  emu_cta->slots[w][l] = pred ? 1 : 0;
  emu_cta->warps[w]->arrive_and_wait();
  unsigned bits = 0;
  for (int k = 0; k < 32; ++k) bits |= static_cast<unsigned>(emu_cta->slots[w][k]) << k;
  emu_cta->warps[w]->arrive_and_wait();
  return bits;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline long long __double_as_longlong(double d) {
  long long u;
  std::memcpy(&u, &d, 8);
  return u;
}
using std::fma;
using std::fmax;
using std::isnan;
