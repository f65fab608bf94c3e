// Steps on a strip: the rows of one chunk against a tile of columns. Shared by the
// forward and the first backward kernel so they agree on which entries move where.
// Tiles live in shared memory with row pitch kTile.
#pragma once

#include "common.cuh"

namespace bspf::cuda {

// The rows of chunk m, with their mask words (rows × C) and chunk-local matches in
// shared memory.
template <typename A>
struct Strip {
  int64_t r0;
  int32_t rows;
  const uint64_t* words;
  const int32_t* match;  // b(i) − r0
  const A* rho;
  const A* lse;
};

// M(i, column) for a row of the strip.
__device__ __forceinline__ bool kept(const uint64_t* row_words, const Chunks& ch, int64_t column) {
  const int64_t c = column / ch.omega;
  return bit_of(row_words[c], static_cast<int32_t>(column - c * ch.omega));
}

// H_{i,n} = 1 − popcount(M[i, chunk n] xor M[p, chunk n]) / |n| (SPEC §3.6).
template <typename A>
__device__ __forceinline__ A pattern_similarity(uint64_t wi, uint64_t wp, int32_t size) {
  return A(1) - static_cast<A>(__popcll(wi ^ wp)) / static_cast<A>(size);
}

// Whether row i of the strip fuses anything at all: it has a match and ρ_i > 0.
template <typename A>
__device__ __forceinline__ bool fuses(const Strip<A>& s, int32_t i) {
  return s.match[i] != i && s.rho[i] > A(0);
}

// Loads the strip's words (rows × C, contiguous in global memory), matches, ρ and lse.
// The caller syncs before use.
template <typename A>
__device__ void load_strip(const uint64_t* words_g, const int32_t* match_g, const A* rho_g, const A* lse_g,
                           const Chunks& ch, int64_t r0, int32_t rows, uint64_t* words, int32_t* match, A* rho,
                           A* lse) {
  const int64_t C = ch.count;
  for (int64_t e = threadIdx.x; e < rows * C; e += kThreads) words[e] = words_g[r0 * C + e];
  for (int i = threadIdx.x; i < rows; i += kThreads) {
    match[i] = static_cast<int32_t>(match_g[r0 + i] - r0);
    rho[i] = rho_g[r0 + i];
    lse[i] = lse_g[r0 + i];
  }
}

// P(i, j) = exp(L(i, j) − lse_i) in place. Element e is handled by the same thread as in
// weights_tile, so no barrier is needed between the two.
template <typename A>
__device__ void probs_in_place(A* tile, const Strip<A>& s, int32_t cols) {
  for (int e = threadIdx.x; e < s.rows * cols; e += kThreads) {
    const int i = e / cols, j = e % cols;
    tile[i * kTile + j] = exp_acc(tile[i * kTile + j] - s.lse[i]);
  }
}

// R = P ⊙ M + F on columns [c0, c0 + cols) (SPEC §3.7–3.8). Fusion runs one thread per
// column over the source rows in increasing order, so sums are race-free and
// deterministic. Ends with a barrier.
template <typename A>
__device__ void weights_tile(const A* probs, A* weights, const Strip<A>& s, const Chunks& ch, int64_t c0,
                             int32_t cols, bool fuse) {
  const int64_t C = ch.count;
  for (int e = threadIdx.x; e < s.rows * cols; e += kThreads) {
    const int i = e / cols, j = e % cols;
    weights[i * kTile + j] = kept(s.words + i * C, ch, c0 + j) ? probs[i * kTile + j] : A(0);
  }
  __syncthreads();
  if (fuse) {
    for (int j = threadIdx.x; j < cols; j += kThreads) {
      const int64_t column = c0 + j;
      const int64_t c = column / ch.omega;
      const int32_t bit = static_cast<int32_t>(column - c * ch.omega);
      const int32_t size = ch.size(c);
      for (int i = 0; i < s.rows; ++i) {
        if (!fuses(s, i)) continue;
        const int p = s.match[i];
        const uint64_t wi = s.words[i * C + c], wp = s.words[p * C + c];
        if (bit_of(wi, bit) || !bit_of(wp, bit)) continue;  // moves only pruned → kept
        const A alpha = s.rho[i] * pattern_similarity<A>(wi, wp, size);
        weights[p * kTile + j] += alpha * probs[i * kTile + j];
      }
    }
  }
  __syncthreads();
}

// Adds Σ_j tile(i, j) · other(i, j) over j < cols to acc[i], one warp per row.
template <typename A>
__device__ void add_row_dots(const A* tile, const A* other, int32_t rows, int32_t cols, A* acc) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int i = warp; i < rows; i += kWarps) {
    A v = A(0);
    for (int j = lane; j < cols; j += 32) v += other ? tile[i * kTile + j] * other[i * kTile + j] : tile[i * kTile + j];
    v = warp_sum(v);
    if (lane == 0) acc[i] += v;
  }
}

}  // namespace bspf::cuda
