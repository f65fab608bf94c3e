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
using OmpThreadNum = int (*)();

struct OpenMP {
  GompParallel parallel = nullptr;
  OmpThreadNum thread_num = nullptr;
};

OpenMP find_openmp() {
  OpenMP omp;
  omp.parallel = reinterpret_cast<GompParallel>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
  omp.thread_num = reinterpret_cast<OmpThreadNum>(dlsym(RTLD_DEFAULT, "omp_get_thread_num"));
  if (!omp.parallel || !omp.thread_num) omp = OpenMP{};
  return omp;
}

struct TeamCall {
  void (*body)(void*, int32_t);
  void* ctx;
  OmpThreadNum thread_num;
};

void on_openmp_thread(void* data) {
  const TeamCall& call = *static_cast<TeamCall*>(data);
  call.body(call.ctx, static_cast<int32_t>(call.thread_num()));
}

}  // namespace

void run_team(int32_t threads, void (*body)(void* ctx, int32_t worker), void* ctx) {
  // Looked up on each call (a few hundred ns against calls of a millisecond), so a
  // runtime loaded after this module, as when torch is imported later, is still found.
  const OpenMP omp = find_openmp();
  if (omp.parallel) {
    TeamCall call{body, ctx, omp.thread_num};
    omp.parallel(on_openmp_thread, &call, static_cast<unsigned>(threads), 0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int32_t w = 1; w < threads; ++w) pool.emplace_back(body, ctx, w);
  body(ctx, 0);
  for (auto& t : pool) t.join();
}

}  // namespace bspf::cpu
