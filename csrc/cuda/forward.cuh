// The fused forward (SPEC §3): one CTA per (strip of whole chunks, (b, h)), no separate
// mask pass. In order, on shared memory laid out by ForwardPlan:
//   1. logits L = scale·X_s·Xᵀ of the strip against every column, once, on tensor cores
//      for fp16/bf16 (warp_gemm.cuh), column tiles of 64 staged one after another;
//   2. the keep mask: every upper block that touches the strip is decided by one warp
//      (selection.cuh) and written to the strip's rows (its mirror too when both chunks
//      are in the strip); diagonal blocks are full;
//   3. row statistics (lse), then the best matches from the staged strip rows;
//   4. P = exp(L − lse) in place, fusion column by column (sources before zeroing, rows
//      in increasing order: deterministic), pruned entries zeroed, Z and 1/Z; a strip with
//      a row sum too small for that linear form (extreme logits) recomputes its logits and
//      does step 4 in log space instead (docs/spec.md §3a);
//   5. out = (R / Z)·V on tensor cores, the value tiles staged transposed, 64 columns
//      of V at a time.
// The block_mask op runs steps 1–2 only.
#pragma once

#include "common.cuh"
#include "forward_plan.cuh"
#include "launch.cuh"
#include "selection.cuh"
#include "warp_gemm.cuh"

namespace bspf::cuda {

// Rows [r0, r0 + count) of x into a zero-padded (rows × depth) staged tile.
template <typename T>
__device__ void stage_rows(staged_t<T>* dst, int32_t pitch, int32_t rows, int32_t depth, const Rows<T>& x,
                           int64_t r0, int32_t count, int64_t dim) {
  using S = staged_t<T>;
  for (int e = threadIdx.x; e < rows * depth; e += kThreads) {
    const int r = e / depth, k = e % depth;
    dst[r * pitch + k] = (r < count && k < dim) ? static_cast<S>(x(r0 + r, k)) : S(0.0f);
  }
}

// Probabilities of the strip as the left operand of A·V: R(row, k) / Z_row, rounded to the
// staged type when it is a tensor-core operand.
template <typename A, typename S>
struct ScaledRows {
  const A* p;
  int32_t ld;
  const A* inv_z;
  __device__ __forceinline__ uint32_t pair(int row, int k) const {
    const A s = inv_z[row];
    return pack2(from_acc<S>(p[row * ld + k] * s), from_acc<S>(p[row * ld + k + 1] * s));
  }
  __device__ __forceinline__ A at(int row, int k) const { return p[row * ld + k]; }
};

template <typename T>
struct ForwardSmem {
  using A = acc_t<T>;
  using S = staged_t<T>;
  using Key = typename KeyOf<A>::type;
  A* logits;
  S* strip_x;
  S* tile;  // staged X column tile, then Vᵀ tiles
  Key* keys;
  uint64_t* words;
  A *lse, *rho, *log_z, *inv_z, *norm;
  int32_t* match;  // strip-local
  __device__ ForwardSmem(unsigned char* base, const ForwardPlan& f)
      : logits(reinterpret_cast<A*>(base + f.logits)),
        strip_x(reinterpret_cast<S*>(base + f.strip_x)),
        tile(reinterpret_cast<S*>(base + f.scratch)),
        keys(reinterpret_cast<Key*>(base + f.scratch)),
        words(reinterpret_cast<uint64_t*>(base + f.words)),
        lse(reinterpret_cast<A*>(base + f.lse)),
        rho(reinterpret_cast<A*>(base + f.rho)),
        log_z(reinterpret_cast<A*>(base + f.log_z)),
        inv_z(reinterpret_cast<A*>(base + f.inv_z)),
        norm(reinterpret_cast<A*>(base + f.norm)),
        match(reinterpret_cast<int32_t*>(base + f.match)) {}
};

// The strip: rows [r0, r0 + rows) = chunks [first, last).
struct StripRange {
  int32_t first, last, rows;
  int64_t r0;
};

// Step 1. Entries outside [0, rows) × [0, N) are written as zeros: A·V reads them.
template <typename T>
__device__ void strip_logits(const ForwardSmem<T>& sm, const ForwardPlan& f, const Rows<T>& x,
                             const StripRange& s, int64_t n, int64_t dim, acc_t<T> scale) {
  using A = acc_t<T>;
  using S = staged_t<T>;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_tiles = f.rows_pad / 16;
  for (int64_t c0 = 0; c0 < n; c0 += kStripRows) {
    const int32_t cols = static_cast<int32_t>(lesser<int64_t>(kStripRows, n - c0));
    const int col_tiles = (cols + 15) / 16 * 2;  // up to the padded width
    __syncthreads();  // earlier readers of the tile are done
    stage_rows<T>(sm.tile, f.x_pitch, kStripRows, f.depth, x, c0, cols, dim);
    __syncthreads();
    for (int t = warp; t < row_tiles * col_tiles; t += kWarps) {
      const int rt = t / col_tiles, ct = t % col_tiles;
      A acc[4] = {A(0), A(0), A(0), A(0)};
      warp_tile_16x8<T>(acc, SmemRows<S>{sm.strip_x + rt * 16 * f.x_pitch, f.x_pitch},
                        SmemRows<S>{sm.tile + ct * 8 * f.x_pitch, f.x_pitch}, f.depth);
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = rt * 16 + frag_row(lane, r), col = ct * 8 + frag_col(lane, r);
        const bool inside = row < s.rows && col < cols;
        sm.logits[row * f.logit_pitch + c0 + col] = inside ? scale * acc[r] : A(0);
      }
    }
  }
  __syncthreads();
}

// Step 2. Every upper block (a, b) with a or b in the strip, once per CTA.
template <typename T>
__device__ void strip_masks(const ForwardSmem<T>& sm, const ForwardPlan& f, const StripRange& s, const Chunks& ch,
                            const acc_t<T>* score_kernel, int64_t keep_full, int64_t keep_last) {
  using A = acc_t<T>;
  const int32_t C = ch.count;
  const int warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < s.rows; i += kThreads) {
    const int32_t c = static_cast<int32_t>((s.r0 + i) / ch.omega);
    sm.words[i * C + c] = low_bits(ch.size(c));
  }
  if (warp >= f.select_warps) return;
  A w[9];
#pragma unroll
  for (int e = 0; e < 9; ++e) w[e] = score_kernel[e];
  auto* keys = sm.keys + static_cast<size_t>(warp) * ch.omega * ch.omega;
  const auto local = [&](int32_t c) { return static_cast<int32_t>(ch.begin(c) - s.r0); };
  int64_t task = 0;
  const auto decide = [&](int32_t a, int32_t b) {
    if (task++ % f.select_warps != warp) return;
    const bool a_here = a >= s.first, b_here = b < s.last;
    const UpperBlock<A> block =
        a_here ? UpperBlock<A>{sm.logits, f.logit_pitch, local(a), static_cast<int32_t>(ch.begin(b)), ch.size(a),
                               ch.size(b), false}
               : UpperBlock<A>{sm.logits, f.logit_pitch, local(b), static_cast<int32_t>(ch.begin(a)), ch.size(a),
                               ch.size(b), true};
    select_upper_block(block, w, b == C - 1 ? keep_last : keep_full, keys);
    if (a_here) write_row_words(keys, block.rows, block.cols, sm.words, local(a), C, b);
    if (b_here && b >= s.first) write_column_words(keys, block.rows, block.cols, sm.words, local(b), C, a);
    __syncwarp();  // the keys are free for the next block
  };
  for (int32_t a = s.first; a < s.last; ++a)
    for (int32_t b = a + 1; b < C; ++b) decide(a, b);
  for (int32_t a = 0; a < s.first; ++a)
    for (int32_t b = s.first; b < s.last; ++b) decide(a, b);
}

// Step 3a. lse of every full logit row, one warp per row.
template <typename A>
__device__ void row_lse(A* logits, int32_t pitch, int32_t rows, int64_t n, A* lse) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int i = warp; i < rows; i += kWarps) {
    const A* row = logits + i * pitch;
    A top = neg_inf<A>();
    for (int64_t j = lane; j < n; j += 32) top = fmax(top, row[j]);
    top = warp_max(top);
    A sum = A(0);
    for (int64_t j = lane; j < n; j += 32) sum += exp_acc(row[j] - top);
    sum = warp_sum(sum);
    if (lane == 0) lse[i] = top + log_acc(sum);
  }
}

// Step 3b. b(i) and ρ_i from the staged strip rows (SPEC §3.5), one thread per row, the
// first candidate taken and a later one only if strictly better (as on the CPU).
template <typename T>
__device__ void best_matches(const ForwardSmem<T>& sm, const ForwardPlan& f, const StripRange& s, const Chunks& ch,
                             int64_t dim) {
  using A = acc_t<T>;
  const auto dot = [&](int i, int j) {
    A acc = A(0);
    for (int64_t k = 0; k < dim; ++k)
      acc = fma_acc(to_acc(sm.strip_x[i * f.x_pitch + k]), to_acc(sm.strip_x[j * f.x_pitch + k]), acc);
    return acc;
  };
  for (int i = threadIdx.x; i < s.rows; i += kThreads) sm.norm[i] = sqrt_acc(dot(i, i));
  __syncthreads();
  const A eps = static_cast<A>(kCosineEps);
  for (int i = threadIdx.x; i < s.rows; i += kThreads) {
    const int64_t c = (s.r0 + i) / ch.omega;
    const int lo = static_cast<int>(ch.begin(c) - s.r0), hi = lo + ch.size(c);
    int best = i;
    A best_cos = neg_inf<A>();
    for (int j = lo; j < hi; ++j) {
      if (j == i) continue;
      const A prod = sm.norm[i] * sm.norm[j];
      const A cos = dot(i, j) / (prod < eps ? eps : prod);
      if (best == i || cos > best_cos) {
        best = j;
        best_cos = cos;
      }
    }
    sm.match[i] = best;
    sm.rho[i] = best == i ? A(0) : (best_cos < A(0) ? A(0) : best_cos);
  }
}

// Step 4, in place (SPEC §3.7–3.8): R = P ⊙ M + F, then Z. The linear form, P = exp(L − lse)
// and A = R / Z, is exact while every row sum Z_i is at least LinearFloor (common.cuh); a strip
// with a smaller one is evaluated again in log space (fuse_and_normalise_in_log_space, with
// the logits recomputed, bitwise the same): docs/spec.md §3a.

// Fusion, one thread per (chunk of the strip, column): it alone touches that column of the
// chunk's rows, reading pruned sources and adding into kept targets, sources in increasing
// order (deterministic). add(p, i, j, alpha) adds source (i, j)'s share α = ρ_i·H into (p, j).
template <typename T, typename Add>
__device__ void fuse_columns(const ForwardSmem<T>& sm, const StripRange& s, const Chunks& ch, int64_t n,
                             const Add& add) {
  using A = acc_t<T>;
  const int32_t C = ch.count;
  const int32_t chunks = s.last - s.first;
  for (int64_t e = threadIdx.x; e < int64_t{chunks} * n; e += kThreads) {
    const int32_t c = s.first + static_cast<int32_t>(e / n);
    const int64_t j = e % n;
    const int32_t col_chunk = static_cast<int32_t>(j / ch.omega), bit = static_cast<int32_t>(j % ch.omega);
    const A size = static_cast<A>(ch.size(col_chunk));
    const int lo = static_cast<int>(ch.begin(c) - s.r0), hi = lo + ch.size(c);
    for (int i = lo; i < hi; ++i) {
      const int p = sm.match[i];
      if (p == i || !(sm.rho[i] > A(0))) continue;
      const uint64_t wi = sm.words[i * C + col_chunk], wp = sm.words[p * C + col_chunk];
      if (bit_of(wi, bit) || !bit_of(wp, bit)) continue;  // moves only pruned → kept
      add(p, i, j, sm.rho[i] * (A(1) - static_cast<A>(__popcll(wi ^ wp)) / size));
    }
  }
}

// Pruned entries zeroed, Z̃_i = Σ_j R(i, j) / e^{shift_i} (shift 0 when null), 1/Z̃ and
// log Z_i = shift_i + log Z̃_i. Returns, to every thread, whether some row's Z̃ is below
// LinearFloor (only meaningful for the linear form, shift = null).
template <typename T>
__device__ bool normalise_rows(const ForwardSmem<T>& sm, const ForwardPlan& f, const StripRange& s,
                               const Chunks& ch, int64_t n, const acc_t<T>* shift) {
  using A = acc_t<T>;
  const int32_t C = ch.count, pitch = f.logit_pitch;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  bool small = false;
  for (int i = warp; i < f.rows_pad; i += kWarps) {
    if (i >= s.rows) {  // padding rows of the last mma tile
      if (lane == 0) sm.inv_z[i] = A(0);
      continue;
    }
    A z = A(0);
    for (int64_t j = lane; j < n; j += 32) {
      const bool kept = bit_of(sm.words[i * C + j / ch.omega], static_cast<int32_t>(j % ch.omega));
      const A r = kept ? sm.logits[i * pitch + j] : A(0);
      sm.logits[i * pitch + j] = r;
      z += r;
    }
    z = warp_sum(z);
    if (lane == 0) {
      sm.log_z[i] = (shift ? shift[i] : A(0)) + log_acc(z);
      sm.inv_z[i] = A(1) / z;
      small = small || z < LinearFloor<A>::value;
    }
  }
  return __syncthreads_or(small) != 0;
}

// The linear form. Returns whether some row sum is below LinearFloor.
template <typename T>
__device__ bool fuse_and_normalise(const ForwardSmem<T>& sm, const ForwardPlan& f, const StripRange& s,
                                   const Chunks& ch, int64_t n, bool fuse) {
  using A = acc_t<T>;
  const int32_t pitch = f.logit_pitch;
  for (int64_t e = threadIdx.x; e < int64_t{s.rows} * n; e += kThreads) {
    const int i = static_cast<int>(e / n);
    const int64_t j = e % n;
    sm.logits[i * pitch + j] = exp_acc(sm.logits[i * pitch + j] - sm.lse[i]);
  }
  __syncthreads();
  if (fuse) {
    fuse_columns<T>(sm, s, ch, n, [&](int p, int i, int64_t j, A alpha) {
      sm.logits[p * pitch + j] += alpha * sm.logits[i * pitch + j];
    });
    __syncthreads();
  }
  return normalise_rows<T>(sm, f, s, ch, n, nullptr);
}

// The log-space form (docs/spec.md §3a), as the portable CPU path: every term of R is kept
// as its log, ℓ(i, j) = min(L − lse_i, 0) for an own kept entry and ℓ(i, j) + log(ρ_i·H) for
// a share moved to p = b(i); row p is shifted by its largest term t_p, so R_p / e^{t_p} has
// entries ≤ 1 and a sum ≥ 1 however far its terms lie below the row's largest logit.
template <typename T>
__device__ void fuse_and_normalise_in_log_space(const ForwardSmem<T>& sm, const ForwardPlan& f,
                                                const StripRange& s, const Chunks& ch, int64_t n, bool fuse) {
  using A = acc_t<T>;
  const int32_t C = ch.count, pitch = f.logit_pitch;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  A* shift = sm.norm;  // the norms are not needed after the matching
  for (int64_t e = threadIdx.x; e < int64_t{s.rows} * n; e += kThreads) {
    const int i = static_cast<int>(e / n);
    const int64_t j = e % n;
    sm.logits[i * pitch + j] = at_most_zero(sm.logits[i * pitch + j] - sm.lse[i]);
  }
  __syncthreads();
  const auto kept = [&](int i, int64_t j) {
    return bit_of(sm.words[i * C + j / ch.omega], static_cast<int32_t>(j % ch.omega));
  };
  // t_p, one warp per row: its own kept terms, then the shares its chunk's rows move to it.
  for (int p = warp; p < s.rows; p += kWarps) {
    A top = neg_inf<A>();
    for (int64_t j = lane; j < n; j += 32)
      if (kept(p, j)) top = fmax(top, sm.logits[p * pitch + j]);
    if (fuse) {
      const int64_t c = (s.r0 + p) / ch.omega;
      const int lo = static_cast<int>(ch.begin(c) - s.r0), hi = lo + ch.size(c);
      for (int i = lo; i < hi; ++i) {
        if (i == p || sm.match[i] != p || !(sm.rho[i] > A(0))) continue;
        for (int64_t j = lane; j < n; j += 32) {
          const int32_t col_chunk = static_cast<int32_t>(j / ch.omega), bit = static_cast<int32_t>(j % ch.omega);
          const uint64_t wi = sm.words[i * C + col_chunk], wp = sm.words[p * C + col_chunk];
          if (bit_of(wi, bit) || !bit_of(wp, bit)) continue;
          const A alpha = sm.rho[i] * (A(1) - static_cast<A>(__popcll(wi ^ wp)) / static_cast<A>(ch.size(col_chunk)));
          top = fmax(top, sm.logits[i * pitch + j] + log_acc(alpha));  // log 0 = −inf: no term
        }
      }
    }
    top = warp_max(top);
    if (lane == 0) shift[p] = top;
  }
  __syncthreads();
  // Own terms in place; pruned entries keep their ℓ: they are the fusion's sources.
  for (int64_t e = threadIdx.x; e < int64_t{s.rows} * n; e += kThreads) {
    const int i = static_cast<int>(e / n);
    const int64_t j = e % n;
    if (kept(i, j)) sm.logits[i * pitch + j] = exp_acc(sm.logits[i * pitch + j] - shift[i]);
  }
  __syncthreads();
  if (fuse) {
    fuse_columns<T>(sm, s, ch, n, [&](int p, int i, int64_t j, A alpha) {
      sm.logits[p * pitch + j] += exp_acc(sm.logits[i * pitch + j] + log_acc(alpha) - shift[p]);
    });
    __syncthreads();
  }
  normalise_rows<T>(sm, f, s, ch, n, shift);
}

// Step 5. out = (R / Z)·V, 64 value columns at a time; each warp holds up to
// kTilesPerWarp 16×8 tiles of the strip's output.
constexpr int kTilesPerWarp = (kStripRows / 16) * (kStripRows / 8) / kWarps;

template <typename T>
__device__ void attend_values(const ForwardSmem<T>& sm, const ForwardPlan& f, const StripRange& s, const Rows<T>& v,
                              int64_t n, int64_t dv, T* out) {
  using A = acc_t<T>;
  using S = staged_t<T>;
  constexpr bool half = IsHalf<T>::value;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_tiles = f.rows_pad / 16;
  for (int64_t d0 = 0; d0 < dv; d0 += kStripRows) {
    const int32_t width = static_cast<int32_t>(lesser<int64_t>(kStripRows, dv - d0));
    const int col_tiles = (width + 7) / 8, tiles = row_tiles * col_tiles;
    A acc[kTilesPerWarp][4];
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[t][r] = A(0);
    for (int64_t c0 = 0; c0 < n; c0 += kStripRows) {
      const int32_t cols = static_cast<int32_t>(lesser<int64_t>(kStripRows, n - c0));
      __syncthreads();  // earlier readers of the tile are done
      // Vᵀ: row d holds value column d0 + d over tokens c0 … c0 + 63 (zeros past N).
      for (int e = threadIdx.x; e < kStripRows * kStripRows; e += kThreads) {
        const int j = e / kStripRows, d = e % kStripRows;
        sm.tile[d * f.v_pitch + j] = (j < cols && d < width) ? static_cast<S>(v(c0 + j, d0 + d)) : S(0.0f);
      }
      __syncthreads();
      const int32_t depth = half ? (cols + 15) / 16 * 16 : cols;
#pragma unroll
      for (int t = 0; t < kTilesPerWarp; ++t) {
        const int tile = warp + t * kWarps;
        if (tile >= tiles) break;  // warp-uniform
        const int rt = tile / col_tiles, ct = tile % col_tiles;
        warp_tile_16x8<T>(acc[t], ScaledRows<A, S>{sm.logits + rt * 16 * f.logit_pitch + c0, f.logit_pitch,
                                                   sm.inv_z + rt * 16},
                          SmemRows<S>{sm.tile + ct * 8 * f.v_pitch, f.v_pitch}, depth);
      }
    }
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t) {
      const int tile = warp + t * kWarps;
      if (tile >= tiles) break;
      const int rt = tile / col_tiles, ct = tile % col_tiles;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = rt * 16 + frag_row(lane, r), col = ct * 8 + frag_col(lane, r);
        if (row >= s.rows || col >= width) continue;
        // The FMA path multiplies by 1/Z once here; the tensor-core path already did.
        const A value = half ? acc[t][r] : acc[t][r] * sm.inv_z[row];
        out[(s.r0 + row) * dv + d0 + col] = from_acc<T>(value);
      }
    }
  }
}

// keep_full / keep_last: k of an upper block whose column chunk is full / the last one
// (its rows are always a full chunk), from keep_count on the host.
template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(ForwardParams fp, ForwardPlan f, int64_t keep_full,
                                                           int64_t keep_last, bool mask_only) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const ForwardSmem<T> sm(smem, f);
  const Chunks ch(fp.p.seqlen, fp.p.block_size);
  const int64_t n = ch.n, C = ch.count, D = fp.p.head_dim, Dv = fp.p.value_dim;
  StripRange s;
  s.first = static_cast<int32_t>(blockIdx.x) * f.strip_chunks;
  s.last = lesser<int32_t>(ch.count, s.first + f.strip_chunks);
  s.r0 = ch.begin(s.first);
  s.rows = static_cast<int32_t>(lesser<int64_t>(n, ch.begin(s.last)) - s.r0);
  const A scale = static_cast<A>(fp.p.scale);

  for (int64_t pair = blockIdx.y; pair < pair_count(fp.p); pair += gridDim.y) {
    const Rows<T> x = pair_rows<T>(fp.qk, fp.qk_stride, pair, fp.p.heads);
    __syncthreads();  // the previous pair is done with shared memory
    stage_rows<T>(sm.strip_x, f.x_pitch, f.rows_pad, f.depth, x, s.r0, s.rows, D);
    strip_logits<T>(sm, f, x, s, n, D, scale);
    strip_masks<T>(sm, f, s, ch, static_cast<const A*>(fp.score_kernel), keep_full, keep_last);
    __syncthreads();
    uint64_t* words_g = fp.saved.mask_words + pair * n * C + s.r0 * C;
    for (int64_t e = threadIdx.x; e < int64_t{s.rows} * C; e += kThreads) words_g[e] = sm.words[e];
    if (mask_only) continue;

    row_lse(sm.logits, f.logit_pitch, s.rows, n, sm.lse);
    best_matches<T>(sm, f, s, ch, D);
    __syncthreads();
    if (fuse_and_normalise<T>(sm, f, s, ch, n, fp.p.fuse)) {  // CTA-uniform; rare
      strip_logits<T>(sm, f, x, s, n, D, scale);
      fuse_and_normalise_in_log_space<T>(sm, f, s, ch, n, fp.p.fuse);
    }
    const int64_t row0 = pair * n + s.r0;
    for (int i = threadIdx.x; i < s.rows; i += kThreads) {
      fp.saved.match[row0 + i] = static_cast<int32_t>(s.r0 + sm.match[i]);
      static_cast<A*>(fp.saved.rho)[row0 + i] = sm.rho[i];
      static_cast<A*>(fp.saved.lse)[row0 + i] = sm.lse[i];
      static_cast<A*>(fp.saved.log_row_sum)[row0 + i] = sm.log_z[i];
    }
    if (Dv > 0) {
      const Rows<T> v = pair_rows<T>(fp.v, fp.v_stride, pair, fp.p.heads);
      attend_values<T>(sm, f, s, v, n, Dv, static_cast<T*>(fp.out) + pair * n * Dv);
    }
  }
}

// ------------------------------------------------------------------------ launchers

template <typename T>
size_t forward_shared_bytes(const Problem& p, size_t smem_limit) {
  return ForwardPlan::choose<T>(p, smem_limit).bytes;
}

template <typename T>
void launch_strips(const ForwardParams& params, size_t smem_limit, cudaStream_t stream, bool mask_only) {
  const Chunks ch(params.p.seqlen, params.p.block_size);
  const ForwardPlan f = ForwardPlan::choose<T>(params.p, smem_limit);
  const int64_t keep_full = keep_count(params.keep_ratio, ch.omega, ch.omega);
  const int64_t keep_last = keep_count(params.keep_ratio, ch.omega, ch.size(ch.count - 1));
  launch_kernel(forward_kernel<T>, grid_for(f.strips, params.p.pairs()), kThreads, f.bytes, stream,
                mask_only ? "launching the mask kernel" : "launching the forward kernel", params, f, keep_full,
                keep_last, mask_only);
}

template <typename T>
void launch_mask(const ForwardParams& params, size_t smem_limit, cudaStream_t stream) {
  launch_strips<T>(params, smem_limit, stream, true);
}

template <typename T>
void launch_forward(const ForwardParams& params, size_t smem_limit, cudaStream_t stream) {
  launch_strips<T>(params, smem_limit, stream, false);
}

}  // namespace bspf::cuda
