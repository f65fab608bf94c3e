// Pieces of the per-(batch, head) computation shared by the portable kernels (scalar.cpp,
// score_kernel_grad.cpp): chunk geometry, mask bits, gathering a pair's rows. Compiled for
// baseline x86-64 only; the AVX2 translation units must not include it (see kernels.h: an
// inline function shared with them could be emitted with AVX).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace bspf::cpu::portable {

inline int popcount(uint64_t w) { return __builtin_popcountll(w); }

// Bits [0, n) set.
inline uint64_t low_bits(int64_t n) { return n >= 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1; }

// Chunk geometry of one sequence.
struct Chunks {
  int64_t n, omega, count;
  Chunks(int64_t seqlen, int64_t block) : n(seqlen), omega(block), count((seqlen + block - 1) / block) {}
  int64_t begin(int64_t c) const { return c * omega; }
  int64_t size(int64_t c) const { return std::min(omega, n - c * omega); }
};

// Copies one (b, h) slice of a strided (B, H, N, D) tensor into a dense N×D buffer.
template <typename T>
void gather_rows(const T* base, const int64_t* stride, int64_t b, int64_t h, int64_t n, int64_t d,
                 std::vector<T>& dst) {
  dst.resize(n * d);
  const T* src = base + b * stride[0] + h * stride[1];
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) dst[i * d + k] = src[i * stride[2] + k * stride[3]];
}

}  // namespace bspf::cpu::portable
