// The keep mask of one upper block (SPEC §3.2–3.3), decided by one warp: 3×3 scores of
// the block's logits as order-preserving integer keys, the k-th largest key by bisection
// on its bits with ballot/popc counts (only the threshold is needed, not a sort), ties at
// the threshold to the smaller row-major index of the upper block.
//
// A strip CTA holds the logits of its own rows against every column. It scores an upper
// block (a, b), a < b, in the block's own frame whichever side it holds: from the rows of
// chunk a directly, or from the rows of chunk b through the mirror (L is bitwise
// symmetric, see warp_gemm.cuh). Both CTAs that need the block therefore make the same
// decision without talking to each other.
#pragma once

#include "common.cuh"

namespace bspf::cuda {

// Order-preserving keys: a larger score has a larger key. NaN ranks as −inf (last, as on
// the CPU) and −0 as +0 so that equal scores have equal keys and the index decides.
__device__ __forceinline__ uint32_t order_key(float s) {
  if (isnan(s)) s = -INFINITY;
  if (s == 0.0f) s = 0.0f;
  const uint32_t u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ unsigned long long order_key(double s) {
  if (isnan(s)) s = -static_cast<double>(INFINITY);
  if (s == 0.0) s = 0.0;
  const unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(s));
  return (u >> 63) ? ~u : (u | (1ull << 63));
}

template <typename A> struct KeyOf { using type = uint32_t; };
template <> struct KeyOf<double> { using type = unsigned long long; };

// Logits of the upper block (a, b) in its own frame, zero outside it (the 3×3 kernel's
// padding), read from a strip's logits (row pitch `pitch`, strip-local rows, global
// columns). mirrored = false: the strip holds chunk a's rows, row0 is the first of them
// and col0 the first column of chunk b. mirrored = true: the strip holds chunk b's rows,
// row0 is the first of them and col0 the first column of chunk a.
template <typename A>
struct UpperBlock {
  const A* logits;
  int32_t pitch, row0, col0, rows, cols;
  bool mirrored;
  __device__ __forceinline__ A at(int i, int j) const {
    if (i < 0 || j < 0 || i >= rows || j >= cols) return A(0);
    return mirrored ? logits[(row0 + j) * pitch + col0 + i] : logits[(row0 + i) * pitch + col0 + j];
  }
  // S(i, j) = Σ W[a][b] · L(i + a − 1, j + b − 1), a and b ascending (the same sum in
  // either frame).
  __device__ __forceinline__ A score(int i, int j, const A (&w)[9]) const {
    A s = A(0);
#pragma unroll
    for (int a = 0; a < 3; ++a)
#pragma unroll
      for (int b = 0; b < 3; ++b) s = fma_acc(w[a * 3 + b], at(i + a - 1, j + b - 1), s);
    return s;
  }
};

// Leaves keys[e] = 1 for the k kept entries of the block and 0 for the others (e
// row-major, rows·cols entries). Every lane of the warp calls it; lane l only ever
// touches entries e ≡ l (mod 32) until the final __syncwarp, so no other sync is needed.
template <typename A>
__device__ void select_upper_block(const UpperBlock<A>& block, const A (&w)[9], int64_t k,
                                   typename KeyOf<A>::type* keys) {
  using Key = typename KeyOf<A>::type;
  constexpr unsigned kFull = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  const int count = block.rows * block.cols;
  for (int e = lane; e < count; e += 32) keys[e] = order_key(block.score(e / block.cols, e % block.cols, w));

  if (k >= count || k <= 0) {
    for (int e = lane; e < count; e += 32) keys[e] = k > 0;
    __syncwarp();
    return;
  }
  // The k-th largest key t: the largest t with #{key ≥ t} ≥ k, built bit by bit. When a
  // count is exactly k, {key ≥ candidate} is the kept set and no tie straddles it.
  Key t = 0;
  bool exact = false;
  for (int bit = 8 * static_cast<int>(sizeof(Key)) - 1; bit >= 0 && !exact; --bit) {
    const Key candidate = t | (Key{1} << bit);
    int at_least = 0;
    for (int base = 0; base < count; base += 32) {
      const int e = base + lane;
      at_least += __popc(__ballot_sync(kFull, e < count && keys[e] >= candidate));
    }
    if (at_least >= k) {
      t = candidate;
      exact = at_least == k;
    }
  }
  if (exact) {
    for (int e = lane; e < count; e += 32) keys[e] = keys[e] >= t;
    __syncwarp();
    return;
  }
  int above = 0;
  for (int base = 0; base < count; base += 32) {
    const int e = base + lane;
    above += __popc(__ballot_sync(kFull, e < count && keys[e] > t));
  }
  // Of the keys equal to t, the first (k − above) in row-major order are kept.
  const int need = static_cast<int>(k) - above;
  const unsigned lanes_below = (1u << lane) - 1u;
  int taken = 0;
  for (int base = 0; base < count; base += 32) {
    const int e = base + lane;
    const Key key = e < count ? keys[e] : Key{0};
    const bool tie = e < count && key == t;
    const unsigned ties = __ballot_sync(kFull, tie);
    const bool keep = key > t || (tie && taken + __popc(ties & lanes_below) < need);
    if (e < count) keys[e] = keep;
    taken += __popc(ties);
  }
  __syncwarp();
}

// Row words of the block's rows (bit j of row i = keep(i, j)) into words[(row0 + i)·C + c].
template <typename Key>
__device__ void write_row_words(const Key* keep, int rows, int cols, uint64_t* words, int row0, int C, int c) {
  for (int i = threadIdx.x & 31; i < rows; i += 32) {
    uint64_t word = 0;
    for (int j = 0; j < cols; ++j) word |= static_cast<uint64_t>(keep[i * cols + j] != 0) << j;
    words[(row0 + i) * C + c] = word;
  }
}

// The mirror's row words: bit i of row j = keep(i, j), into words[(row0 + j)·C + c].
template <typename Key>
__device__ void write_column_words(const Key* keep, int rows, int cols, uint64_t* words, int row0, int C, int c) {
  for (int j = threadIdx.x & 31; j < cols; j += 32) {
    uint64_t word = 0;
    for (int i = 0; i < rows; ++i) word |= static_cast<uint64_t>(keep[i * cols + j] != 0) << i;
    words[(row0 + j) * C + c] = word;
  }
}

}  // namespace bspf::cuda
