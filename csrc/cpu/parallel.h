// A minimal fork-join loop over independent work items. Each item is computed by one
// thread from start to end, so results do not depend on scheduling (bitwise
// determinism), and the thread count comes from the caller (torch.get_num_threads()),
// so we never oversubscribe against torch's own pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace bspf::cpu {

// fn(item, worker) for item in [0, items); worker in [0, threads) indexes per-thread scratch.
template <typename Fn>
void parallel_for(int64_t items, int32_t num_threads, Fn&& fn) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, items));
  if (threads == 1) {
    for (int64_t i = 0; i < items; ++i) fn(i, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_lock;
  auto work = [&](int32_t worker) {
    try {
      for (int64_t i = next++; i < items; i = next++) fn(i, worker);
    } catch (...) {
      std::lock_guard<std::mutex> guard(error_lock);
      if (!error) error = std::current_exception();
      next = items;
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int32_t w = 1; w < threads; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

inline int32_t worker_count(int64_t items, int32_t num_threads) {
  return static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>(num_threads, items)));
}

}  // namespace bspf::cpu
