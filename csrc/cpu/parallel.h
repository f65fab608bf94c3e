// A minimal fork-join loop over independent work items. Each item is computed by one
// thread from start to end, so results do not depend on scheduling (bitwise
// determinism), and the thread count comes from the caller (torch.get_num_threads()).
//
// The team is the process's OpenMP team when an OpenMP runtime is loaded (torch's, in
// practice): then our workers ARE torch's workers, so nothing is oversubscribed and
// torch's threads, still spinning after its last parallel region, pick our work up at
// once instead of competing with threads of ours for the cores. Without one (the module
// loaded on its own) it falls back to std::thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>

#include "kernels.h"

namespace bspf::cpu {

// Runs body(ctx, worker, workers) once on each of `workers` workers (worker 0 is the
// caller) and returns when all are done. Workers may be fewer than the `threads` asked (a
// nested call), never more. Defined in parallel.cpp.
void run_team(int32_t threads, void (*body)(void* ctx, int32_t worker, int32_t workers), void* ctx);

// The workers of one run_team call meet here (wait_for_team, kernels.h): each returns once
// all `workers` have arrived, and sees what every other wrote before arriving. One barrier
// serves any number of rounds.
struct TeamBarrier {
  std::atomic<int32_t> arrived{0};
  std::atomic<uint32_t> round{0};
};

// fn(item, worker) for item in [0, items); worker in [0, threads) indexes per-thread scratch.
template <typename Fn>
void parallel_for(int64_t items, int32_t num_threads, Fn&& fn) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, items));
  if (threads == 1) {
    for (int64_t i = 0; i < items; ++i) fn(i, 0);
    return;
  }
  struct Shared {
    Fn& fn;
    int64_t items;
    std::atomic<int64_t> next{0};
    std::exception_ptr error;
    std::mutex error_lock;
  } shared{fn, items};
  run_team(static_cast<int32_t>(threads), [](void* ctx, int32_t worker, int32_t /*workers*/) {
    Shared& s = *static_cast<Shared*>(ctx);
    try {
      for (int64_t i = s.next++; i < s.items; i = s.next++) s.fn(i, worker);
    } catch (...) {
      std::lock_guard<std::mutex> guard(s.error_lock);
      if (!s.error) s.error = std::current_exception();
      s.next = s.items;
    }
  }, &shared);
  if (shared.error) std::rethrow_exception(shared.error);
}

inline int32_t worker_count(int64_t items, int32_t num_threads) {
  return static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>(num_threads, items)));
}

}  // namespace bspf::cpu
