// The worker team behind parallel_for (parallel.h): the process's OpenMP team when an
// OpenMP runtime is loaded, else plain std::threads.
#include "parallel.h"

#include <dlfcn.h>

#include <thread>
#include <vector>

namespace bspf::cpu {
namespace {

// libgomp's entry points (LLVM's and Intel's runtimes export the same ones). Looked up,
// never linked: the module must load without any OpenMP runtime, and must not bring a
// second one into a process that already has torch's.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpThreadQuery = int (*)();

struct OpenMP {
  GompParallel parallel = nullptr;
  OmpThreadQuery thread_num = nullptr, num_threads = nullptr;
};

OpenMP find_openmp() {
  OpenMP omp;
  omp.parallel = reinterpret_cast<GompParallel>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
  omp.thread_num = reinterpret_cast<OmpThreadQuery>(dlsym(RTLD_DEFAULT, "omp_get_thread_num"));
  omp.num_threads = reinterpret_cast<OmpThreadQuery>(dlsym(RTLD_DEFAULT, "omp_get_num_threads"));
  if (!omp.parallel || !omp.thread_num || !omp.num_threads) omp = OpenMP{};
  return omp;
}

struct TeamCall {
  void (*body)(void*, int32_t, int32_t);
  void* ctx;
  OmpThreadQuery thread_num, num_threads;
};

void on_openmp_thread(void* data) {
  const TeamCall& call = *static_cast<TeamCall*>(data);
  call.body(call.ctx, static_cast<int32_t>(call.thread_num()), static_cast<int32_t>(call.num_threads()));
}

inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

}  // namespace

void run_team(int32_t threads, void (*body)(void* ctx, int32_t worker, int32_t workers), void* ctx) {
  // Looked up on each call (a few hundred ns against calls of a millisecond), so a
  // runtime loaded after this module, as when torch is imported later, is still found.
  const OpenMP omp = find_openmp();
  if (omp.parallel) {
    TeamCall call{body, ctx, omp.thread_num, omp.num_threads};
    omp.parallel(on_openmp_thread, &call, static_cast<unsigned>(threads), 0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int32_t w = 1; w < threads; ++w) pool.emplace_back(body, ctx, w, threads);
  body(ctx, 0, threads);
  for (auto& t : pool) t.join();
}

void wait_for_team(TeamBarrier* barrier, int32_t workers) {
  if (workers <= 1) return;
  // The last to arrive opens the next round; the others spin on the round number (the
  // waits are microseconds: a team's workers run the same stage on equal shares), and
  // yield after a while, should the team have more threads than the machine has cores.
  const uint32_t round = barrier->round.load(std::memory_order_acquire);
  if (barrier->arrived.fetch_add(1, std::memory_order_acq_rel) == workers - 1) {
    barrier->arrived.store(0, std::memory_order_relaxed);
    barrier->round.store(round + 1, std::memory_order_release);
    return;
  }
  for (int spins = 0; barrier->round.load(std::memory_order_acquire) == round; ++spins) {
    if (spins < 4000)
      spin_pause();
    else
      std::this_thread::yield();
  }
}

}  // namespace bspf::cpu
