// The CPU implementations behind bspf/cpu.h. dispatch.cpp picks one per call.
#pragma once

#include <cstdint>

#include "bspf/params.h"

namespace bspf::cpu::scalar {
void mask(const ForwardParams& params);
void forward(const ForwardParams& params);
void backward(const BackwardParams& params);

// One float32 (batch, head) pair, for the pairs the AVX2 path hands back (extreme logits:
// see avx2::Outcome). Uses the thread it is called on.
void forward_one_pair(const ForwardParams& params, int64_t pair);
void backward_one_pair(const BackwardParams& params, int64_t pair);
}  // namespace bspf::cpu::scalar

namespace bspf::cpu {
// Where the workers of one run_team call wait for each other (parallel.h). Defined for
// baseline x86-64 in parallel.cpp, and called from the AVX2 path through this declaration.
struct TeamBarrier;
void wait_for_team(TeamBarrier* barrier, int32_t workers);
}  // namespace bspf::cpu

// The AVX2+FMA path (float32 only), compiled with -mavx2 -mfma in its own translation
// unit. It exposes one (batch, head) pair at a time and leaves the thread loop, the
// scratch pool and every std:: container to dispatch.cpp, which is compiled for
// baseline x86-64: an inline function or template instantiation shared by both
// translation units could otherwise be emitted with AVX instructions and picked by the
// linker for the portable path too, crashing it on CPUs without AVX2.
namespace bspf::cpu::avx2 {

// Per-thread scratch memory, opaque to callers. Grows on demand and is reused.
struct Workspace;
Workspace* create_workspace();
void destroy_workspace(Workspace* workspace);

// k of an off-diagonal block, from bspf::keep_count (evaluated by the caller): every
// upper block has full rows, and its columns are full or the ragged last chunk.
struct KeepCounts {
  int64_t full = 0;  // keep_count(r, Ω, Ω)
  int64_t tail = 0;  // keep_count(r, Ω, |last chunk|)
};

// What became of a pair. kNoMemory: scratch memory could not be allocated (nothing is
// written). kNeedsPortable: float32 in linear space, as this path computes, cannot
// represent the pair's rows exactly enough (extreme logits: a row whose kept entries all
// lie far below its maximum); the caller computes the pair with scalar::*_one_pair, which
// works in log space and overwrites whatever was written.
enum class Outcome { kDone, kNoMemory, kNeedsPortable };

// What the k-th score search of a block starts from (avx2/selection.cpp): the smallest and
// largest order key of its real entries, and the mean and standard deviation of its scores.
struct BlockScores {
  int32_t lowest_key, highest_key;
  double mean, deviation;
};

// Helpers both vector paths' block scoring use. Internal linkage: a copy compiled into the
// AVX-512 unit must never be picked by the linker for another (see this namespace's
// comment above).
namespace {

// All nine weights of a 3×3 score kernel equal (the box kernel): then a score is the
// weight times the sum of its nine logits, summed row by row (score_block).
inline bool uniform_kernel(const float* w) {
  bool uniform = true;
  for (int e = 1; e < 9; ++e) uniform &= w[e] == w[0];
  return uniform;
}

// Whether a block's scores summed to a finite mean and deviation: the sums a uniform
// kernel takes first can overflow where the weighted terms would not, and such a block is
// scored again term by term.
inline bool finite_scores(const BlockScores& scores) {
  return scores.mean - scores.mean == 0.0 && scores.deviation - scores.deviation == 0.0;
}

}  // namespace

// The chunks of a row as the fusion reads them (SPEC §3.1, §3.6): chunk c is the columns
// [c · omega, c · omega + size), size = omega except for the last of `chunks`, which is
// `last` wide; similarity_full[p] and similarity_last[p] are H = 1 − p / size for a
// popcount p of a full and of the last chunk. A row is `ld` floats long (N rounded up to
// 8); from chunk `careful` on, a chunk's last vector of 8 may reach past the row's end (the
// last chunk, and with Ω under 8 a few before it).
struct ChunkGrid {
  int64_t omega, chunks, last;
  const float* similarity_full;
  const float* similarity_last;
  int64_t ld, careful;
};

namespace {  // internal linkage, as the helpers above

// Chunk c of the fusion between row i and b(i) (mask words wi and wp): the columns row i
// prunes and b(i) keeps, as bits from the chunk's first column; the chunk's H; and where
// the chunk lies. What fuse_row and fused_grad_row read of each chunk, on either path.
struct FusionChunk {
  uint64_t moved;
  float similarity;
  int64_t begin, size;
};

inline FusionChunk fusion_chunk(const ChunkGrid& g, const uint64_t* wi, const uint64_t* wp, int64_t c) {
  const bool last = c == g.chunks - 1;
  const float* similarity = last ? g.similarity_last : g.similarity_full;
  return {~wi[c] & wp[c], similarity[__builtin_popcountll(wi[c] ^ wp[c])], c * g.omega, last ? g.last : g.omega};
}

}  // namespace

// The path's stages whose speed is set by the vector width: the dense GEMM (logits, and
// the backward's products), the sparse row products (A·V over kept entries, dV), the
// scoring of an upper block and its mask words once searched, the forward's row work
// (exps, row sums, fusion) and the backward's probabilities and fusion terms.
// kProducts computes them 8 lanes wide; avx512::kProducts 16 lanes wide, on CPUs with
// AVX-512F (dispatch.cpp chooses). Their contracts are in avx2/gemm.h, avx2/selection.h and
// avx2/softmax_fusion.h.
struct Products {
  void (*gemm)(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc,
               int64_t rows, int64_t cols, float alpha, bool upper);
  void (*sparse_rows)(const float* coef, int64_t ldc, const uint64_t* bitmaps, int64_t bw, int64_t ld,
                      const float* b, int64_t ldb, int64_t width, const float* alpha, int64_t rows, int32_t* lists,
                      float* out, int64_t ldo);
  BlockScores (*score_block)(const float* block, int64_t ld, int64_t rows, int64_t cols, const float* score_kernel,
                             float* tile, int32_t* keys);
  void (*kept_words)(const int32_t* keys, int64_t rows, int64_t cols, int32_t threshold, uint64_t* upper,
                     uint64_t* lower, int64_t stride);
  void (*upper_exps)(float* square, int64_t ld, int64_t n, float shift, int64_t row_begin, int64_t row_end);
  void (*row_sums)(const float* row, int64_t ld, const uint64_t* bitmap, float* total, float* kept);
  float (*fuse_row)(const ChunkGrid& grid, const uint64_t* wi, const uint64_t* wp, float share, const float* source,
                    float* target);
  void (*probs_rows)(float* square, int64_t ld, int64_t n, const float* lse, int64_t row_begin, int64_t row_end);
  float (*fused_grad_row)(const ChunkGrid& grid, const uint64_t* wi, const uint64_t* wp, float rho,
                          const float* probs_i, const float* grad_target, float* grad_i);
};
extern const Products kProducts;

// The width of B at which sparse_rows goes over each row's own kept columns (and so never
// reads the coefficients of pruned entries); at other widths it goes over the union of two
// rows' columns, and pruned coefficients must be 0.
constexpr int64_t kOwnColumnsWidth = 64;

// The workers that compute one pair together (forward_pair, backward_pair): this is worker
// `worker` of `workers`, and all of them meet at `barrier` between the stages. An aggregate
// without member initializers, so that no constructor is emitted in both kinds of
// translation unit.
struct Team {
  int32_t worker, workers;
  TeamBarrier* barrier;
};
constexpr Team kAlone = {0, 1, nullptr};  // a pair computed by one thread

// What a workspace holds for a pair: all of it (a thread alone, or the first worker of a
// team, whose workspace the team shares), or a team worker's own scratch only (a few small
// buffers, where all of it is one to five N×N squares).
enum class Holding { kWholePair, kOwnScratch };

// Reserve what forward_pair and mask_pair (ForwardParams) or backward_pair
// (BackwardParams) need of a workspace for these params; false when the memory could not
// be allocated.
bool reserve_workspace(const ForwardParams& params, Workspace* workspace, Holding holding);
bool reserve_workspace(const BackwardParams& params, Workspace* workspace, Holding holding);

// One pair's mask words (block_mask), alone or by a team as forward_pair (workspaces
// reserved by reserve_workspace). kDone or, alone, kNoMemory.
Outcome mask_pair(const ForwardParams& params, const KeepCounts& keep, const Products& products, int64_t pair,
                  Workspace* shared, Workspace* own, const Team& team);
// One pair's forward. Alone (kAlone) it reserves `own` and uses it for everything
// (`shared` is `own`). In a team of several workers, every worker calls it for the same
// pair with the same `shared` workspace (the pair's X, Xᵀ, V and logits square) and its own
// `own` (scratch), both reserved beforehand by reserve_workspace (`shared` as kWholePair);
// each computes its share of every stage, and the results are those of one worker alone,
// bit for bit. A worker returns kNeedsPortable when a chunk of rows it computed needs the
// portable path (then the whole pair goes there).
Outcome forward_pair(const ForwardParams& params, const KeepCounts& keep, const Products& products, int64_t pair,
                     Workspace* shared, Workspace* own, const Team& team);
// One pair's backward, alone or by a team as forward_pair (workspaces reserved by
// reserve_workspace). kNeedsPortable: the pair's saved log Z is below what this path
// computes exactly (every worker of a team returns it, before writing anything).
Outcome backward_pair(const BackwardParams& params, const Products& products, int64_t pair, Workspace* shared,
                      Workspace* own, const Team& team);

}  // namespace bspf::cpu::avx2

// The AVX-512 products (avx512/products.cpp), compiled with -mavx512f in their own
// translation unit under the same rules as the AVX2 path's.
namespace bspf::cpu::avx512 {
extern const avx2::Products kProducts;
}  // namespace bspf::cpu::avx512
