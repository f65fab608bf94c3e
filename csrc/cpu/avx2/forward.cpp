// The AVX2+FMA CPU path for float32: SPEC §3 and §4 computed one (batch, head) pair at a
// time with its whole working set (an N×N tile of logits, ~160 KB at N = 197) in L2.
//
// One file per stage: vector.h (vector helpers), workspace.h (geometry, scratch), gemm
// (logits and the sparse A·V products), selection (the keep mask), matching (b(i), ρ),
// softmax_fusion (exps, fused rows, sums), this file (the forward and mask of a pair),
// backward.cpp, and stage_clock.h (the marks between the forward's stages that
// tools/profile_cpu_stages.py compiles in). Every file here is compiled with -mavx2 -mfma
// only, and the path is chosen at run time by dispatch.cpp. To keep the portable path safe
// on CPUs without AVX2 these files share no inline function or template with the portable
// translation units: what they define lives in bspf::cpu::avx2 (so the linker can merge an
// inline helper only with another AVX2 file's copy), they use no std:: containers or
// algorithms, no <cmath> overloads (compiler builtins instead), and of params.h only its
// plain structs and constants.
//
// Where it differs from scalar.cpp (the correctness baseline), it differs only in
// rounding: dot products and sums are vectorised, so float32 scores may swap places at
// a near-tie of a block's k-th score (SPEC §6), exactly as any two float32
// implementations may. The selection rule itself (top k, ties to the smaller row-major
// index, NaN last) is the same.
#include <immintrin.h>

#include <cstdint>
#include <new>

#include "../kernels.h"
#include "gemm.h"
#include "matching.h"
#include "selection.h"
#include "softmax_fusion.h"
#include "stage_clock.h"
#include "workspace.h"

namespace bspf::cpu::avx2 {

namespace {

// A worker's own scratch: the score tiles and keys, the matching's Gram matrix, a chunk's
// output rows, bitmaps and sparse_rows' lists (Ω ≤ 64).
bool reserve_own_forward(const Geometry& g, Workspace& ws) {
  return ws.tile.reserve((64 + 2) * (64 + 2 + 2 * kLanes)) && ws.keys.reserve(kSelectionKeys) &&
         ws.small.reserve(136 + 64 * 64) && ws.out_row.reserve(64 * g.dvp) &&
         ws.bitmap.reserve(64 * bitmap_words(g)) && ws.lists.reserve(32 * (g.ld + kLanes));
}

}  // namespace

bool reserve_forward(const Geometry& g, Workspace& ws) {
  return ws.x.reserve(g.ld * g.dp) && ws.xt.reserve(g.dp * g.ld) && ws.v.reserve(g.ld * g.dvp) &&
         ws.logits.reserve(g.square()) && reserve_own_forward(g, ws);
}

const Products kProducts = {gemm,     sparse_rows, score_block,   kept_words,
                             upper_exps, row_sums, fuse_row,    probs_rows, fused_grad_row};

Workspace* create_workspace() { return new (std::nothrow) Workspace(); }

void destroy_workspace(Workspace* ws) { delete ws; }

Outcome mask_pair(const ForwardParams& fp, const KeepCounts& keep, const Products& products, int64_t pair,
                  Workspace* shared, Workspace* own, const Team& team) {
  Workspace& sh = *shared;  // the pair's X, Xᵀ and square
  Workspace& ws = *own;     // this worker's scratch
  const Geometry g(fp.p);
  if (team.workers == 1 && !reserve_forward(g, ws)) return Outcome::kNoMemory;
  uint64_t* words = fp.saved.mask_words + pair * g.n * g.chunks;
  // The forward's first steps (forward_pair), the upper tiles of L only.
  for_my_bands(g, team, 0, [&](int64_t i0) {
    gather_x_band(g, static_cast<const float*>(fp.qk), fp.qk_stride, pair, fp.p.heads, i0, sh.x.data);
    clear_mask_words(g, i0, i0 + 8 < g.n ? i0 + 8 : g.n, words);
  });
  for_my_bands(g, team, 0, [&](int64_t i0) { transpose_x_band(g, i0, sh.x.data, sh.xt.data); });
  meet(team);
  for_my_bands(g, team, 0, [&](int64_t i0) {
    logits_band(g, products, sh.x.data, sh.xt.data, static_cast<float>(fp.p.scale), i0, sh.logits.data);
  });
  meet(team);
  select_upper_blocks(g, products, sh.logits.data, static_cast<const float*>(fp.score_kernel), keep, team, ws,
                      words);
  return Outcome::kDone;
}

bool reserve_workspace(const ForwardParams& fp, Workspace* workspace, Holding holding) {
  const Geometry g(fp.p);
  return holding == Holding::kOwnScratch ? reserve_own_forward(g, *workspace) : reserve_forward(g, *workspace);
}

Outcome forward_pair(const ForwardParams& fp, const KeepCounts& keep, const Products& products, int64_t pair,
                     Workspace* shared, Workspace* own, const Team& team) {
  Workspace& sh = *shared;  // the pair's X, Xᵀ, V and square
  Workspace& ws = *own;     // this worker's scratch
  const Geometry g(fp.p);
  if (team.workers == 1 && !reserve_forward(g, ws)) return Outcome::kNoMemory;
  uint64_t* words = fp.saved.mask_words + pair * g.n * g.chunks;
  int32_t* match = fp.saved.match + pair * g.n;
  float* rho = static_cast<float*>(fp.saved.rho) + pair * g.n;
  float* lse = static_cast<float*>(fp.saved.lse) + pair * g.n;
  float* log_row_sum = static_cast<float*>(fp.saved.log_row_sum) + pair * g.n;
  float* out = static_cast<float*>(fp.out) + pair * g.n * g.dv;
  const float scale = static_cast<float>(fp.p.scale);
  float* square = sh.logits.data;  // L, then E, then the rows' weights

  // Output rows of a whole number of vectors are written in place, and value rows with unit
  // column stride read where they are: A·V reads only kept rows of V and writes whole rows,
  // so the gather and the copy back (a few % of the call) are not needed. Unless V's rows
  // are off the 64-byte lines that the gathered copy's rows start on: A·V is bound by its
  // loads of V, and vector loads across two lines made it ~45% slower (the forward 12–14%
  // slower with V 16 bytes off, AMD EPYC), far more than the gather costs.
  const bool out_in_place = g.dv == g.dvp;
  const float* v_pair = static_cast<const float*>(fp.v) + (pair / fp.p.heads) * fp.v_stride[0] +
                        (pair % fp.p.heads) * fp.v_stride[1];
  const bool gathered_on_lines = g.dvp % 16 == 0;
  const bool v_on_lines = reinterpret_cast<uintptr_t>(v_pair) % 64 == 0 && fp.v_stride[2] % 16 == 0;
  const bool v_in_place = out_in_place && fp.v_stride[3] == 1 && (v_on_lines || !gathered_on_lines);
  const float* values = v_in_place ? v_pair : sh.v.data;
  const int64_t ldv = v_in_place ? fp.v_stride[2] : g.dvp;

  // A team shares the pair out by chunks of rows (for_my_bands, for_my_chunks: workspace.h).
  // A stage that reads what others wrote in the one before starts after they meet.

  BSPF_STAGE(kStageStart);
  for_my_bands(g, team, 0, [&](int64_t i0) {
    gather_x_band(g, static_cast<const float*>(fp.qk), fp.qk_stride, pair, fp.p.heads, i0, sh.x.data);
    const int64_t end = i0 + 8 < g.n ? i0 + 8 : g.n;
    if (!v_in_place)
      gather(static_cast<const float*>(fp.v), fp.v_stride, pair, fp.p.heads, g.n, g.dv, i0, end, g.dvp, sh.v.data);
    clear_mask_words(g, i0, end, words);
  });
  for_my_bands(g, team, 0, [&](int64_t i0) { transpose_x_band(g, i0, sh.x.data, sh.xt.data); });
  meet(team);
  for_my_bands(g, team, 0, [&](int64_t i0) { logits_band(g, products, sh.x.data, sh.xt.data, scale, i0, square); });
  meet(team);
  // The exps' one shift for all rows, from L's diagonal, which no stage writes before them.
  const float shift = logit_bound(g, square);
  for_my_bands(g, team, 8, [&](int64_t i0) { mirror_band(g, Mirror::kDiagonalBlocks, i0, square); });
  BSPF_STAGE(kStageLogits);  // and V's gather, where it runs, and clearing the mask words
  select_upper_blocks(g, products, square, static_cast<const float*>(fp.score_kernel), keep, team, ws, words);
  BSPF_STAGE(kStageMask);
  // No meeting before the matching: of a chunk's diagonal block it reads the lower tiles
  // of bands that start in the chunk, which this worker mirrored, and tiles the GEMM wrote.
  compute_match(g, sh.x.data, square, scale, team, ws, match, rho);
  BSPF_STAGE(kStageMatch);

  // E = exp(L − c) with one shift for all rows (symmetric: half the exps), then one chunk
  // of rows at a time while it is in cache: softmax sums, weights with fusion, and A·V
  // over the kept entries only.
  meet(team);  // E takes L's place
  for_my_bands(g, team, 0, [&](int64_t i0) { upper_exps_band(g, products, shift, i0, square); });
  meet(team);
  for_my_bands(g, team, 8, [&](int64_t i0) { mirror_exps_band(g, i0, square); });
  meet(team);
  BSPF_STAGE(kStageExps);
  for (int64_t m = 0; m < g.chunks; ++m) {
    if (team.workers > 1 && chunk_share(m, team.workers) != team.worker) continue;  // for_my_chunks, but the body returns
    const int64_t r0 = g.begin(m), rows = g.size(m);
    float alpha[64];
    if (!chunk_forward_rows(g, products, m, sh.x.data, sh.xt.data, scale, shift, square, words, match, rho,
                            fp.p.fuse, ws.bitmap.data, lse + r0, log_row_sum + r0, alpha))
      return Outcome::kNeedsPortable;
    if (sparse_rows_reads_pruned(g.dvp)) zero_pruned(g, m, ws.bitmap.data, square);
    BSPF_STAGE(kStageRows);
    float* rows_out = out_in_place ? out + r0 * g.dv : ws.out_row.data;
    const int64_t ldo = out_in_place ? g.dv : g.dvp;
    products.sparse_rows(square + r0 * g.ld, g.ld, ws.bitmap.data, bitmap_words(g), g.ld, values, ldv, g.dvp, alpha,
                         rows, ws.lists.data, rows_out, ldo);
    if (!out_in_place) copy_rows(ws.out_row.data, g.dvp, rows, g.dv, out + r0 * g.dv, g.dv);
    BSPF_STAGE(kStageValues);
  }
  return Outcome::kDone;
}

}  // namespace bspf::cpu::avx2
