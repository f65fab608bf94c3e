// One (batch, head) pair of the AVX2 path computed by a team of threads against the same
// pair computed by one thread: the results must be the same bits. Built with
// ThreadSanitizer and run over a matrix of shapes by tools/race_check_cpu.sh, which fails on
// any race report as on any difference. No OpenMP runtime is loaded, so run_team's workers
// are std::threads (csrc/cpu/parallel.cpp).
//
//   cpu_teams ENTRY N BLOCK D DV THREADS PATH    (ENTRY: forward, mask or backward;
//                                                 PATH: avx2 or avx512)
//
// Prints "<arguments>: same bits" and exits 0, or "…: DIFFERENT" and exits 1.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/parallel.h"

using namespace bspf;
using namespace bspf::cpu;

namespace {

// What one computation of the pair writes.
struct Results {
  std::vector<uint64_t> words;
  std::vector<int32_t> match;
  std::vector<float> rho, lse, log_row_sum, out, grad_qk, grad_v;
};

template <typename T>
bool same(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Whether the entry wrote the same bits in both.
bool same_bits(const std::string& entry, const Results& a, const Results& b) {
  if (entry == "mask") return same(a.words, b.words);
  if (entry == "backward") return same(a.grad_qk, b.grad_qk) && same(a.grad_v, b.grad_v);
  return same(a.words, b.words) && same(a.match, b.match) && same(a.rho, b.rho) && same(a.lse, b.lse) &&
         same(a.log_row_sum, b.log_row_sum) && same(a.out, b.out);
}

struct Pair {
  Problem p;
  std::vector<float> qk, v, grad_out;
  float score_kernel[9];
  avx2::KeepCounts keep;
  int64_t qk_stride[4], v_stride[4];
};

ForwardParams forward_params(const Pair& pair, Results& r) {
  const int64_t n = pair.p.seqlen, chunks = pair.p.num_chunks();
  r.words.assign(n * chunks, 0);
  r.match.assign(n, 0);
  r.rho.assign(n, 0.0f);
  r.lse.assign(n, 0.0f);
  r.log_row_sum.assign(n, 0.0f);
  r.out.assign(n * pair.p.value_dim, 0.0f);
  ForwardParams fp;
  fp.p = pair.p;
  fp.keep_ratio = 0.5;
  fp.qk = pair.qk.data();
  fp.v = pair.v.data();
  std::memcpy(fp.qk_stride, pair.qk_stride, sizeof fp.qk_stride);
  std::memcpy(fp.v_stride, pair.v_stride, sizeof fp.v_stride);
  fp.score_kernel = pair.score_kernel;
  fp.out = r.out.data();
  fp.saved.mask_words = r.words.data();
  fp.saved.match = r.match.data();
  fp.saved.rho = r.rho.data();
  fp.saved.lse = r.lse.data();
  fp.saved.log_row_sum = r.log_row_sum.data();
  return fp;
}

BackwardParams backward_params(const Pair& pair, const ForwardParams& forward, Results& r) {
  r.grad_qk.assign(pair.p.seqlen * pair.p.head_dim, -1.0f);
  r.grad_v.assign(pair.p.seqlen * pair.p.value_dim, -1.0f);
  BackwardParams bp;
  bp.p = pair.p;
  bp.grad_out = pair.grad_out.data();
  std::memcpy(bp.grad_out_stride, pair.v_stride, sizeof bp.grad_out_stride);
  bp.qk = pair.qk.data();
  std::memcpy(bp.qk_stride, pair.qk_stride, sizeof bp.qk_stride);
  bp.v = pair.v.data();
  std::memcpy(bp.v_stride, pair.v_stride, sizeof bp.v_stride);
  bp.saved = forward.saved;
  bp.grad_qk = r.grad_qk.data();
  bp.grad_v = r.grad_v.data();
  return bp;
}

// The entry on (forward, backward) by `team`, with the team's shared and own workspaces.
avx2::Outcome run_entry(const std::string& entry, const Pair& pair, const avx2::Products& products,
                        const ForwardParams& fp, const BackwardParams& bp, avx2::Workspace* shared,
                        avx2::Workspace* own, const avx2::Team& team) {
  if (entry == "mask") return avx2::mask_pair(fp, pair.keep, products, 0, shared, own, team);
  if (entry == "backward") return avx2::backward_pair(bp, products, 0, shared, own, team);
  return avx2::forward_pair(fp, pair.keep, products, 0, shared, own, team);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 8) {
    std::fprintf(stderr, "usage: cpu_teams ENTRY N BLOCK D DV THREADS PATH\n");
    return 2;
  }
  const std::string entry = argv[1], path = argv[7];
  const int64_t n = std::atoll(argv[2]), block = std::atoll(argv[3]), d = std::atoll(argv[4]),
                dv = std::atoll(argv[5]);
  const int threads = std::atoi(argv[6]);
  const avx2::Products& products = path == "avx512" ? avx512::kProducts : avx2::kProducts;

  Pair pair;
  pair.p.batch = 1;
  pair.p.heads = 1;
  pair.p.seqlen = n;
  pair.p.head_dim = d;
  pair.p.value_dim = dv;
  pair.p.block_size = block;
  pair.p.scale = 1.0 / std::sqrt(static_cast<double>(d));
  pair.p.fuse = true;
  pair.p.dtype = DType::kFloat32;
  std::mt19937 rng(static_cast<unsigned>(n * 131 + block));
  std::normal_distribution<float> normal;
  for (auto* values : {&pair.qk, &pair.v, &pair.grad_out}) {
    values->resize(n * (values == &pair.qk ? d : dv));
    for (float& x : *values) x = normal(rng);
  }
  for (float& w : pair.score_kernel) w = 1.0f / 9.0f;
  const int64_t last = n - (pair.p.num_chunks() - 1) * block;
  pair.keep.full = keep_count(0.5, block, block);
  pair.keep.tail = keep_count(0.5, block, last);
  const int64_t qk_stride[4] = {n * d, n * d, d, 1}, v_stride[4] = {n * dv, n * dv, dv, 1};
  std::memcpy(pair.qk_stride, qk_stride, sizeof qk_stride);
  std::memcpy(pair.v_stride, v_stride, sizeof v_stride);

  // One thread alone; the backward's saved buffers come from its forward.
  Results alone, together;
  const ForwardParams fp_alone = forward_params(pair, alone);
  avx2::Workspace* ws = avx2::create_workspace();
  if (entry == "backward") avx2::forward_pair(fp_alone, pair.keep, products, 0, ws, ws, avx2::kAlone);
  const BackwardParams bp_alone = backward_params(pair, fp_alone, alone);
  run_entry(entry, pair, products, fp_alone, bp_alone, ws, ws, avx2::kAlone);

  // The team, three times over the same workspaces (the first worker's holds the pair's
  // buffers, the others' their own scratch only, as dispatch.cpp reserves them).
  const ForwardParams fp_team = forward_params(pair, together);
  const BackwardParams bp_team = backward_params(pair, fp_alone, together);  // the same saved buffers
  std::vector<avx2::Workspace*> workspaces;
  for (int t = 0; t < threads; ++t) {
    workspaces.push_back(avx2::create_workspace());
    const avx2::Holding holding = t == 0 ? avx2::Holding::kWholePair : avx2::Holding::kOwnScratch;
    const bool reserved = entry == "backward" ? avx2::reserve_workspace(bp_team, workspaces.back(), holding)
                                              : avx2::reserve_workspace(fp_team, workspaces.back(), holding);
    if (!reserved) return 2;
  }
  TeamBarrier barrier;
  struct Context {
    const std::string* entry;
    const Pair* pair;
    const avx2::Products* products;
    const ForwardParams* fp;
    const BackwardParams* bp;
    std::vector<avx2::Workspace*>* workspaces;
    TeamBarrier* barrier;
  } context{&entry, &pair, &products, &fp_team, &bp_team, &workspaces, &barrier};
  for (int round = 0; round < 3; ++round)
    run_team(threads, [](void* ctx, int32_t worker, int32_t workers) {
      const Context& c = *static_cast<const Context*>(ctx);
      run_entry(*c.entry, *c.pair, *c.products, *c.fp, *c.bp, (*c.workspaces)[0], (*c.workspaces)[worker],
                avx2::Team{worker, workers, c.barrier});
      wait_for_team(c.barrier, workers);
    }, &context);

  const bool identical = same_bits(entry, alone, together);
  std::printf("%s n %ld block %ld d %ld dv %ld threads %d %s: %s\n", entry.c_str(), static_cast<long>(n),
              static_cast<long>(block), static_cast<long>(d), static_cast<long>(dv), threads, path.c_str(),
              identical ? "same bits" : "DIFFERENT");
  for (avx2::Workspace* w : workspaces) avx2::destroy_workspace(w);
  avx2::destroy_workspace(ws);
  return identical ? 0 : 1;
}
