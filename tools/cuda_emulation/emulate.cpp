// Runs the bspf CUDA kernels on the CPU (one std::thread per CUDA thread, barriers for
// __syncthreads and the warp intrinsics) and compares every output with the scalar CPU
// path on random problems. A developer check for machines without a GPU: it exercises
// the kernels' indexing, tiling, synchronisation and math, not the GPU itself (memory
// model, real shared-memory limits, performance). Build with ./run.sh (ASan or TSan).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../../csrc/cuda/backward.cuh"
#include "../../csrc/cuda/forward.cuh"
#include "../../csrc/cuda/mask.cuh"
#include "bspf/cpu.h"

namespace bspf::cuda {
unsigned char (*emu_smem)[] = nullptr;
}

namespace {

using namespace bspf;
using bspf::cuda::kThreads;

int64_t g_max_grid_y = 2;  // small, so the kernels' loop over (b, h) pairs is exercised

template <typename Body>
void launch(int64_t blocks_x, int64_t pairs, size_t bytes, Body body) {
  const dim3 grid{static_cast<unsigned>(blocks_x), static_cast<unsigned>(std::min(pairs, g_max_grid_y)), 1};
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      // Exactly sized and filled with NaN bytes: reads of unwritten shared memory show.
      std::unique_ptr<unsigned char[]> memory(new unsigned char[bytes]);
      std::fill(memory.get(), memory.get() + bytes, 0xFF);
      bspf::cuda::emu_smem = reinterpret_cast<unsigned char (*)[]>(memory.get());
      std::barrier<> all(kThreads);
      std::vector<std::unique_ptr<std::barrier<>>> warps;
      EmuCta cta{};
      cta.all = &all;
      for (int w = 0; w < kThreads / 32; ++w) {
        warps.emplace_back(new std::barrier<>(32));
        cta.warps[w] = warps.back().get();
      }
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < static_cast<unsigned>(kThreads); ++t)
        threads.emplace_back([&, t] {
          threadIdx = dim3{t, 0, 0};
          blockIdx = dim3{bx, by, 0};
          gridDim = grid;
          blockDim = dim3{static_cast<unsigned>(kThreads), 1, 1};
          emu_cta = &cta;
          body();
        });
      for (auto& th : threads) th.join();
    }
}

// The same launch sequence as csrc/cuda/launch.cuh.
template <typename T>
void cuda_mask(const ForwardParams& fp) {
  using A = cuda::acc_t<T>;
  const cuda::Chunks ch(fp.p.seqlen, fp.p.block_size);
  const int64_t C = ch.count;
  const int64_t kf = keep_count(fp.keep_ratio, ch.omega, ch.omega);
  const int64_t kl = keep_count(fp.keep_ratio, ch.omega, ch.size(C - 1));
  launch(C * C, fp.p.pairs(), cuda::MaskLayout::make<A>(ch.omega).bytes,
         [&] { cuda::mask_kernel<T>(fp, kf, kl); });
}

template <typename T>
void cuda_forward(const ForwardParams& fp) {
  using A = cuda::acc_t<T>;
  cuda_mask<T>(fp);
  const cuda::Chunks ch(fp.p.seqlen, fp.p.block_size);
  launch(ch.count, fp.p.pairs(), cuda::ForwardLayout::make<A>(ch.omega, ch.count).bytes,
         [&] { cuda::forward_kernel<T>(fp); });
}

template <typename T>
void cuda_backward(const BackwardParams& bp, void* row_stats) {
  using A = cuda::acc_t<T>;
  const cuda::Chunks ch(bp.p.seqlen, bp.p.block_size);
  launch(ch.count, bp.p.pairs(), cuda::RowStatsLayout::make<A>(ch.omega, ch.count).bytes,
         [&] { cuda::row_stats_kernel<T>(bp, row_stats); });
  launch(ch.count, bp.p.pairs(), cuda::GradientsLayout::make<A>(ch.omega, ch.count).bytes,
         [&] { cuda::gradients_kernel<T>(bp, row_stats, bp.grad_qk, bp.grad_v); });
}

struct Case {
  int64_t b, h, n, d, dv;
  int32_t omega;
  double keep;
  bool fuse;
  bool strided;  // qk stored as (B, N, H, D)
};

template <typename T>
struct Buffers {
  std::vector<T> qk, v, g, out, rho, lse, z, grad_qk, grad_v, stats;
  std::vector<uint64_t> words;
  std::vector<int32_t> match;
};

template <typename T>
double max_rel(const std::vector<T>& a, const std::vector<T>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = a[i], y = b[i];
    if (std::isnan(x) || std::isnan(y)) return INFINITY;
    worst = std::max(worst, std::abs(x - y) / std::max(1.0, std::abs(y)));
  }
  return worst;
}

template <typename T>
bool run_case(const Case& c, std::mt19937& rng, double tol) {
  const int64_t pairs = c.b * c.h, n = c.n, C = (n + c.omega - 1) / c.omega;
  std::normal_distribution<double> normal(0.0, 1.0);
  Buffers<T> cpu, gpu;
  std::vector<T> qk(pairs * n * c.d), v(pairs * n * c.dv), g(pairs * n * c.dv);
  for (auto& x : qk) x = static_cast<T>(normal(rng));
  for (auto& x : v) x = static_cast<T>(normal(rng));
  for (auto& x : g) x = static_cast<T>(normal(rng));
  std::vector<T> kernel(9);
  for (auto& x : kernel) x = static_cast<T>(0.05 + std::abs(normal(rng)) / 9);

  auto setup = [&](Buffers<T>& bu, ForwardParams& fp, BackwardParams& bp) {
    bu.out.assign(pairs * n * c.dv, T(-7));
    bu.rho.assign(pairs * n, T(-7));
    bu.lse = bu.rho;
    bu.z = bu.rho;
    bu.words.assign(pairs * n * C, 0xDEADBEEFull);
    bu.match.assign(pairs * n, -5);
    bu.grad_qk.assign(pairs * n * c.d, T(0));
    bu.grad_v.assign(pairs * n * c.dv, T(0));
    bu.stats.assign(3 * pairs * n, T(0));
    Problem p;
    p.dtype = sizeof(T) == 8 ? DType::kFloat64 : DType::kFloat32;
    p.batch = c.b;
    p.heads = c.h;
    p.seqlen = n;
    p.head_dim = c.d;
    p.value_dim = c.dv;
    p.block_size = c.omega;
    p.scale = 1.0 / std::sqrt(static_cast<double>(c.d));
    p.fuse = c.fuse;
    const int64_t qs[4] = {c.h * n * c.d, n * c.d, c.d, 1};
    const int64_t qs_strided[4] = {c.h * n * c.d, c.d, c.h * c.d, 1};  // (B, N, H, D) storage
    const int64_t vs[4] = {c.h * n * c.dv, n * c.dv, c.dv, 1};
    fp = ForwardParams{};
    fp.p = p;
    fp.keep_ratio = c.keep;
    fp.qk = qk.data();
    fp.v = v.data();
    fp.score_kernel = kernel.data();
    fp.out = bu.out.data();
    fp.saved = Saved{bu.words.data(), bu.match.data(), bu.rho.data(), bu.lse.data(), bu.z.data()};
    fp.num_threads = 1;
    for (int k = 0; k < 4; ++k) {
      fp.qk_stride[k] = c.strided ? qs_strided[k] : qs[k];
      fp.v_stride[k] = vs[k];
    }
    bp = BackwardParams{};
    bp.p = p;
    bp.grad_out = g.data();
    bp.qk = qk.data();
    bp.v = v.data();
    bp.saved = fp.saved;
    bp.grad_qk = bu.grad_qk.data();
    bp.grad_v = bu.grad_v.data();
    bp.num_threads = 1;
    for (int k = 0; k < 4; ++k) {
      bp.qk_stride[k] = fp.qk_stride[k];
      bp.v_stride[k] = vs[k];
      bp.grad_out_stride[k] = vs[k];
    }
  };
  ForwardParams fc, fg;
  BackwardParams bc, bg;
  setup(cpu, fc, bc);
  setup(gpu, fg, bg);
  cpu::forward(fc);
  cuda_forward<T>(fg);

  int64_t word_diff = 0, match_diff = 0;
  for (size_t i = 0; i < cpu.words.size(); ++i) word_diff += cpu.words[i] != gpu.words[i];
  for (size_t i = 0; i < cpu.match.size(); ++i) match_diff += cpu.match[i] != gpu.match[i];
  const double e_out = max_rel(gpu.out, cpu.out), e_lse = max_rel(gpu.lse, cpu.lse), e_z = max_rel(gpu.z, cpu.z),
               e_rho = max_rel(gpu.rho, cpu.rho);

  // The backward from the same saved buffers (the CPU's), so it is compared alone.
  gpu.words = cpu.words;
  gpu.match = cpu.match;
  gpu.rho = cpu.rho;
  gpu.lse = cpu.lse;
  gpu.z = cpu.z;
  cpu::backward(bc);
  cuda_backward<T>(bg, gpu.stats.data());
  const double e_gqk = max_rel(gpu.grad_qk, cpu.grad_qk), e_gv = max_rel(gpu.grad_v, cpu.grad_v);

  // A second backward run must be bitwise identical (determinism).
  std::vector<T> first_gqk = gpu.grad_qk, first_gv = gpu.grad_v;
  std::fill(gpu.grad_qk.begin(), gpu.grad_qk.end(), T(0));
  std::fill(gpu.grad_v.begin(), gpu.grad_v.end(), T(0));
  std::fill(gpu.stats.begin(), gpu.stats.end(), T(0));
  cuda_backward<T>(bg, gpu.stats.data());
  const bool deterministic = first_gqk == gpu.grad_qk && first_gv == gpu.grad_v;

  const bool ok = word_diff == 0 && match_diff == 0 && e_out < tol && e_lse < tol && e_z < tol && e_rho < tol &&
                  e_gqk < tol && e_gv < tol && deterministic;
  std::printf(
      "%s %-6s B%lld H%lld N%-4lld D%-3lld Dv%-3lld Ω%-2d r%.2f fuse%d strided%d | words %lld match %lld out %.1e "
      "lse %.1e Z %.1e rho %.1e dqk %.1e dv %.1e det %d\n",
      ok ? "ok  " : "FAIL", sizeof(T) == 8 ? "double" : "float", (long long)c.b, (long long)c.h, (long long)n,
      (long long)c.d, (long long)c.dv, c.omega, c.keep, c.fuse, c.strided, (long long)word_diff,
      (long long)match_diff, e_out, e_lse, e_z, e_rho, e_gqk, e_gv, deterministic);
  std::fflush(stdout);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  std::mt19937 rng(1234);
  std::vector<Case> cases = {
      {1, 1, 1, 4, 3, 16, 0.5, true, false},    // N = 1
      {1, 2, 5, 3, 2, 2, 0.5, true, false},     // ragged, tiny
      {2, 1, 20, 8, 5, 4, 0.5, true, true},     // strided qk, two pairs through a grid of 2
      {1, 3, 23, 5, 4, 7, 0.3, true, false},    // Ω = 7, three pairs looped
      {1, 1, 37, 17, 66, 16, 0.5, true, false},  // D > kDepth, Dv > 64 (two value slices)
      {1, 1, 70, 8, 8, 16, 0.5, false, false},  // fuse = False, several column tiles
      {1, 1, 40, 6, 6, 1, 0.5, true, false},    // Ω = 1 (no matches)
      {1, 1, 30, 6, 6, 5, 0.0, true, false},    // keep 0
      {1, 1, 30, 6, 6, 5, 1.0, true, false},    // keep 1
      {1, 1, 130, 70, 33, 64, 0.5, true, false},  // Ω = 64, D > 64
      {1, 1, 100, 4, 3, 33, 0.7, true, false},  // Ω = 33: tiles of one chunk
  };
  if (quick) cases.resize(4);
  bool ok = true;
  for (const Case& c : cases) {
    ok &= run_case<double>(c, rng, 1e-10);
    ok &= run_case<float>(c, rng, 1e-4);
  }
  std::printf(ok ? "ALL OK\n" : "SOME FAILED\n");
  return ok ? 0 : 1;
}
