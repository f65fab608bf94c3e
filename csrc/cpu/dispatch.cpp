// Chooses the CPU implementation per call: the AVX2+FMA path for float32 when this CPU
// has AVX2 and FMA, the portable path otherwise (and always for float64).
// BSPF_CPU_CAPABILITY=scalar|avx2 forces one (tests use it to compare the paths).
//
// Compiled for baseline x86-64 (no -mavx2): it must run, and refuse clearly, on any CPU.
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "bspf/cpu.h"
#include "bspf/validate.h"
#include "kernels.h"
#include "parallel.h"

namespace bspf::cpu {
namespace {

bool cpu_has_avx2() {
#if defined(BSPF_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  // libgcc's check also confirms that the OS saves the ymm registers.
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

#if defined(BSPF_HAVE_AVX2)

// Per-thread AVX2 scratch, kept between calls so its pages stay mapped (allocating and
// first-touching ~1 MB per thread per call would cost more than some whole calls).
class WorkspacePool {
 public:
  ~WorkspacePool() {
    for (avx2::Workspace* w : free_) avx2::destroy_workspace(w);
  }
  std::vector<avx2::Workspace*> acquire(int32_t count) {
    std::vector<avx2::Workspace*> taken;
    std::lock_guard<std::mutex> guard(lock_);
    while (static_cast<int32_t>(taken.size()) < count) {
      if (!free_.empty()) {
        taken.push_back(free_.back());
        free_.pop_back();
        continue;
      }
      avx2::Workspace* fresh = avx2::create_workspace();
      if (!fresh) {
        free_.insert(free_.end(), taken.begin(), taken.end());
        throw std::bad_alloc();
      }
      taken.push_back(fresh);
    }
    return taken;
  }
  void release(const std::vector<avx2::Workspace*>& workspaces) {
    std::lock_guard<std::mutex> guard(lock_);
    free_.insert(free_.end(), workspaces.begin(), workspaces.end());
  }

 private:
  std::mutex lock_;
  std::vector<avx2::Workspace*> free_;
};

WorkspacePool& pool() {
  static WorkspacePool instance;
  return instance;
}

// Runs pair_fn(pair, workspace) for every (b, h) pair on params' threads; each pair is
// computed start to end by one thread, so results do not depend on scheduling.
template <typename Params, typename PairFn>
void run_pairs(const Params& params, PairFn&& pair_fn) {
  const int64_t pairs = params.p.pairs();
  const int32_t workers = worker_count(pairs, params.num_threads);
  std::vector<avx2::Workspace*> workspaces = pool().acquire(workers);
  try {
    parallel_for(pairs, params.num_threads, [&](int64_t pair, int32_t worker) {
      if (!pair_fn(pair, workspaces[worker])) throw std::bad_alloc();
    });
  } catch (...) {
    pool().release(workspaces);
    throw;
  }
  pool().release(workspaces);
}

avx2::KeepCounts keep_counts(const ForwardParams& params) {
  const int64_t omega = params.p.block_size;
  const int64_t last = params.p.seqlen - (params.p.num_chunks() - 1) * omega;
  avx2::KeepCounts keep;
  keep.full = keep_count(params.keep_ratio, omega, omega);
  keep.tail = keep_count(params.keep_ratio, omega, last);
  return keep;
}

// capability() first: a bad BSPF_CPU_CAPABILITY is an error whatever the dtype.
bool use_avx2(DType dtype) {
  const bool avx2 = std::strcmp(capability(), "avx2") == 0;
  return avx2 && dtype == DType::kFloat32;
}

#endif  // BSPF_HAVE_AVX2

}  // namespace

const char* capability() {
  const char* forced = std::getenv("BSPF_CPU_CAPABILITY");
  if (forced && *forced) {
    if (std::strcmp(forced, "scalar") == 0) return "scalar";
    if (std::strcmp(forced, "avx2") == 0) {
      if (!cpu_has_avx2())
        throw std::runtime_error(
#if defined(BSPF_HAVE_AVX2)
            "BSPF_CPU_CAPABILITY=avx2, but this CPU does not support AVX2 and FMA; unset it or use 'scalar'"
#else
            "BSPF_CPU_CAPABILITY=avx2, but this build has no AVX2 path (not an x86-64 build); "
            "unset it or use 'scalar'"
#endif
        );
      return "avx2";
    }
    throw std::invalid_argument(std::string("BSPF_CPU_CAPABILITY must be 'scalar' or 'avx2', got '") + forced + "'");
  }
  return cpu_has_avx2() ? "avx2" : "scalar";
}

void mask(const ForwardParams& params) {
  validate(params, Entry::kMask);
#if defined(BSPF_HAVE_AVX2)
  if (use_avx2(params.p.dtype)) {
    const avx2::KeepCounts keep = keep_counts(params);
    return run_pairs(params, [&](int64_t pair, avx2::Workspace* ws) { return avx2::mask_pair(params, keep, pair, ws); });
  }
#else
  capability();  // rejects a bad BSPF_CPU_CAPABILITY
#endif
  scalar::mask(params);
}

void forward(const ForwardParams& params) {
  validate(params, Entry::kForward);
#if defined(BSPF_HAVE_AVX2)
  if (use_avx2(params.p.dtype)) {
    const avx2::KeepCounts keep = keep_counts(params);
    return run_pairs(params, [&](int64_t pair, avx2::Workspace* ws) {
      const avx2::Outcome outcome = avx2::forward_pair(params, keep, pair, ws);
      if (outcome == avx2::Outcome::kNeedsPortable) scalar::forward_one_pair(params, pair);
      return outcome != avx2::Outcome::kNoMemory;
    });
  }
#else
  capability();
#endif
  scalar::forward(params);
}

void backward(const BackwardParams& params) {
  validate(params);
#if defined(BSPF_HAVE_AVX2)
  if (use_avx2(params.p.dtype))
    return run_pairs(params, [&](int64_t pair, avx2::Workspace* ws) {
      const avx2::Outcome outcome = avx2::backward_pair(params, pair, ws);
      if (outcome == avx2::Outcome::kNeedsPortable) scalar::backward_one_pair(params, pair);
      return outcome != avx2::Outcome::kNoMemory;
    });
#else
  capability();
#endif
  scalar::backward(params);
}

}  // namespace bspf::cpu
