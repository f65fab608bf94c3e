// One (batch, head) pair's geometry and the per-thread scratch memory of the AVX2 path.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../kernels.h"
#include "vector.h"

namespace bspf::cpu::avx2 {

// cos(x, y) = x·y / max(‖x‖‖y‖, eps) (SPEC §3.5), in float.
constexpr float kCosEps = static_cast<float>(kCosineEps);

struct Geometry {
  int64_t n, d, dv;     // sizes
  int64_t omega, chunks, last;  // chunk size, count, size of the last chunk
  int64_t ld;           // N rounded up to 8: row stride of every N×N buffer
  int64_t dp, dvp;      // D and Dv rounded up to 8
  Geometry(const Problem& p)
      : n(p.seqlen), d(p.head_dim), dv(p.value_dim), omega(p.block_size),
        chunks((p.seqlen + p.block_size - 1) / p.block_size),
        last(p.seqlen - ((p.seqlen + p.block_size - 1) / p.block_size - 1) * p.block_size),
        ld(round_up8(p.seqlen)), dp(round_up8(p.head_dim)), dvp(round_up8(p.value_dim)) {
    for (int pc = 0; pc <= 64; ++pc) {
      similarity_full[pc] = 1.0f - static_cast<float>(pc) / static_cast<float>(omega);
      similarity_last[pc] = 1.0f - static_cast<float>(pc) / static_cast<float>(last);
    }
    careful = chunks - 1;  // chunk c's vectors end at c · Ω + round_up8(Ω)
    while (careful > 0 && (careful - 1) * omega + round_up8(omega) > ld) --careful;
  }
  // H = 1 − popcount / |chunk| for each popcount, as the portable path computes it
  // (SPEC §3.6), so the fusion loop does no division.
  float similarity_full[65], similarity_last[65];
  int64_t careful;  // ChunkGrid::careful
  int64_t begin(int64_t c) const { return c * omega; }
  int64_t size(int64_t c) const { return c == chunks - 1 ? last : omega; }
  ChunkGrid grid() const { return {omega, chunks, last, similarity_full, similarity_last, ld, careful}; }
  // + a vector past the last row: a margin (no step's vector reaches past its row's end).
  int64_t square() const { return ld * ld + kLanes; }
};

// Which of `shares` workers takes chunk c when a team shares a pair's chunks out (see
// forward_pair): back and forth, 0, 1, …, shares − 1, shares − 1, …, 1, 0, 0, 1, …, which
// evens out work that falls with c (a row chunk's upper blocks) as well as even work.
inline int64_t chunk_share(int64_t c, int64_t shares) {
  const int64_t turn = c % (2 * shares);
  return turn < shares ? turn : 2 * shares - 1 - turn;
}

// Where a team's workers (kernels.h) wait for each other between steps; alone, nowhere.
inline void meet(const Team& team) {
  if (team.workers > 1) wait_for_team(team.barrier, team.workers);
}

// A team shares a pair out by chunks of rows (chunk_share): its worker computes the steps
// of its chunks' rows, by chunk (for_my_chunks) or by the row bands of 8 from `from` on
// that start in them (for_my_bands; the padding rows past N go with the last chunk), so
// that most of what a step reads was written on the same core. Alone, every chunk and band.
template <typename Body>
void for_my_chunks(const Geometry& g, const Team& team, Body&& body) {
  for (int64_t m = 0; m < g.chunks; ++m)
    if (team.workers == 1 || chunk_share(m, team.workers) == team.worker) body(m);
}

template <typename Body>
void for_my_bands(const Geometry& g, const Team& team, int64_t from, Body&& body) {
  for (int64_t i0 = from; i0 < g.ld; i0 += 8)
    if (team.workers == 1 || chunk_share(i0 < g.n ? i0 / g.omega : g.chunks - 1, team.workers) == team.worker)
      body(i0);
}

// One 64-byte aligned array that grows on demand (contents are not kept when it grows).
template <typename T>
struct Array {
  T* data = nullptr;
  int64_t capacity = 0;
  Array() = default;
  Array(const Array&) = delete;
  Array& operator=(const Array&) = delete;
  ~Array() { std::free(data); }
  bool reserve(int64_t count) {
    if (count <= capacity) return true;
    std::free(data);
    const int64_t bytes = ((count * static_cast<int64_t>(sizeof(T)) + 63) / 64) * 64;
    data = static_cast<T*>(std::aligned_alloc(64, static_cast<size_t>(bytes)));
    capacity = data ? count : 0;
    if (data) std::memset(data, 0, static_cast<size_t>(bytes));  // slack past the rows stays finite
    return data != nullptr;
  }
};

// Copies rows [row_begin, row_end) of one (b, h) slice of a strided (B, H, N, width) tensor
// into a dense buffer of `padded`-float rows (row i at dst + i · padded), zero in the
// padding rows (i ≥ n) and columns.
inline void gather(const float* base, const int64_t* stride, int64_t pair, int64_t heads, int64_t n, int64_t width,
                   int64_t row_begin, int64_t row_end, int64_t padded, float* dst) {
  const float* src = base + (pair / heads) * stride[0] + (pair % heads) * stride[1];
  for (int64_t i = row_begin; i < row_end; ++i) {
    float* row = dst + i * padded;
    if (i >= n) {
      for (int64_t k = 0; k < padded; k += kLanes) _mm256_storeu_ps(row + k, _mm256_setzero_ps());
      continue;
    }
    const float* s = src + i * stride[2];
    if (stride[3] == 1) {
      copy_padded(s, width, row);
    } else {
      for (int64_t k = 0; k < width; ++k) row[k] = s[k * stride[3]];
      for (int64_t k = width; k < padded; ++k) row[k] = 0.0f;
    }
  }
}

// Scratch of one thread. Members sized per call by reserve().
struct Workspace {
  Array<float> x, xt, v, vt, g, dx, dv;        // X, Xᵀ, V, Vᵀ, dOut, dX, dV (padded rows)
  Array<float> logits, weights, grad, work;    // ld×ld squares
  Array<float> tile, small, out_row, column;
  Array<int32_t> keys, lists;
  Array<uint64_t> bitmap;
};

// Reserves the scratch every entry point needs (the backward reserves more on top).
bool reserve_forward(const Geometry& g, Workspace& ws);

}  // namespace bspf::cpu::avx2
