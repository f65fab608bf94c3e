// Chooses the CPU implementation per call: for float32 the AVX2+FMA path, with its
// products 16 lanes wide ("avx512") when this CPU has AVX-512F, 8 lanes wide ("avx2") when
// it has AVX2 and FMA only; the portable path otherwise (and always for float64).
// BSPF_CPU_CAPABILITY=scalar|avx2|avx512 forces one (tests use it to compare the paths).
//
// Compiled for baseline x86-64 (no -mavx2): it must run, and refuse clearly, on any CPU.
#if defined(__linux__)
#include <sched.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
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

bool cpu_has_avx512() {
#if defined(BSPF_HAVE_AVX512) && (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  // As above, for the zmm and mask registers.
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

// Why a forced capability cannot run here, or null when it can.
const char* unavailable(const char* name) {
  if (std::strcmp(name, "scalar") == 0) return nullptr;
  if (std::strcmp(name, "avx2") == 0) {
#if defined(BSPF_HAVE_AVX2)
    return cpu_has_avx2() ? nullptr : "this CPU does not support AVX2 and FMA";
#else
    return "this build has no AVX2 path (not an x86-64 build)";
#endif
  }
#if defined(BSPF_HAVE_AVX512)
  return cpu_has_avx512() ? nullptr : "this CPU does not support AVX-512F (with AVX2 and FMA)";
#else
  return "this build has no AVX-512 path (not an x86-64 build, or a compiler without -mavx512f)";
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
  // Worker w of a call gets the workspace that worker w of the calls before had (the first
  // `count` in the pool, which release puts back first), then fresh ones: so the first
  // worker, which in a team holds the whole pair where the others hold a little scratch,
  // finds a workspace already grown to it.
  std::vector<avx2::Workspace*> acquire(int32_t count) {
    std::lock_guard<std::mutex> guard(lock_);
    const auto reused = static_cast<std::ptrdiff_t>(std::min(free_.size(), static_cast<size_t>(count)));
    std::vector<avx2::Workspace*> taken(free_.begin(), free_.begin() + reused);
    free_.erase(free_.begin(), free_.begin() + reused);
    while (static_cast<int32_t>(taken.size()) < count) {
      avx2::Workspace* fresh = avx2::create_workspace();
      if (!fresh) {
        free_.insert(free_.begin(), taken.begin(), taken.end());
        throw std::bad_alloc();
      }
      taken.push_back(fresh);
    }
    return taken;
  }
  void release(const std::vector<avx2::Workspace*>& workspaces) {
    std::lock_guard<std::mutex> guard(lock_);
    free_.insert(free_.begin(), workspaces.begin(), workspaces.end());
  }

 private:
  std::mutex lock_;
  std::vector<avx2::Workspace*> free_;
};

WorkspacePool& pool() {
  static WorkspacePool instance;
  return instance;
}

// Runs pair_fn(pair, workspace) for the (b, h) pairs [0, pairs) on params' threads; each
// pair is computed start to end by one thread, so results do not depend on scheduling.
template <typename Params, typename PairFn>
void run_pairs(const Params& params, int64_t pairs, PairFn&& pair_fn) {
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

// How many CPUs this process may run on. Teams with more workers than that wait at every
// barrier for a worker the scheduler has set aside (4 threads on 2 CPUs took 8× one
// thread's time at 1×1×197×64).
int64_t available_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// The (batch, head) pairs [first, end), fewer than the threads, by teams of threads
// (pair_fn(pair, shared, own, team): avx2::forward_pair or backward_pair with a team, every
// step of a pair shared out by chunks of rows), where one thread per pair would leave the
// others idle: a batch of one image on a machine with more cores than heads, or the pairs
// left over when the threads do not divide them. The `threads` (no more than the CPUs there
// are) make as many teams as there are pairs (each of the rest goes to no team), but a team
// has no more workers than half the pair's chunks, so that each worker's share of a step
// stays two chunks or more. Each worker reserves its workspace (avx2::reserve_workspace):
// the whole pair's buffers for a team's first worker, whose workspace the team shares, and
// its own scratch only for the others (so that a team takes the memory of one thread alone,
// and a little more). A pair that some worker hands back (kNeedsPortable) goes to
// portable(pair) afterwards. The results are those of one thread per pair, bit for bit.
template <typename Params, typename PairFn, typename Portable>
void pairs_together(const Params& params, int64_t first, int64_t end, int32_t threads, PairFn&& pair_fn,
                    Portable&& portable) {
  std::vector<avx2::Workspace*> workspaces = pool().acquire(threads);
  struct Shared {
    const Params& params;
    PairFn& pair_fn;
    const std::vector<avx2::Workspace*>& workspaces;
    int64_t first, end, largest_team;
    std::unique_ptr<TeamBarrier[]> barriers;    // one per team
    std::vector<unsigned char> reserved;        // per worker
    std::vector<unsigned char> needs_portable;  // per pair and worker
    std::atomic<bool> out_of_memory{false};
  } shared{params,
           pair_fn,
           workspaces,
           first,
           end,
           std::max<int64_t>(1, params.p.num_chunks() / 2),
           std::unique_ptr<TeamBarrier[]>(new TeamBarrier[threads]),
           std::vector<unsigned char>(threads, 0),
           std::vector<unsigned char>((end - first) * threads, 0)};
  run_team(threads, [](void* ctx, int32_t worker, int32_t workers) {
    // From the workers there are (fewer than asked in a nested call): team k of `size`
    // workers takes pairs first + k, first + k + teams, …
    Shared& s = *static_cast<Shared*>(ctx);
    const int64_t pairs = s.end - s.first;
    const int64_t size = std::max<int64_t>(1, std::min<int64_t>(workers / pairs, s.largest_team));
    const int64_t teams = std::max<int64_t>(1, std::min<int64_t>(pairs, workers / size));
    if (worker >= teams * size) return;
    const int64_t k = worker / size;
    TeamBarrier* barrier = &s.barriers[k];
    const avx2::Team team{static_cast<int32_t>(worker % size), static_cast<int32_t>(size), barrier};
    // Reserved here, where the teams are known (a nested call has fewer workers). A team
    // any of whose workers could not reserve computes nothing; all its workers see that.
    s.reserved[worker] = avx2::reserve_workspace(
        s.params, s.workspaces[worker], team.worker == 0 ? avx2::Holding::kWholePair : avx2::Holding::kOwnScratch);
    wait_for_team(barrier, team.workers);
    for (int64_t w = k * size; w < (k + 1) * size; ++w) {
      if (!s.reserved[w]) {
        s.out_of_memory = true;
        return;
      }
    }
    for (int64_t pair = s.first + k; pair < s.end; pair += teams) {
      const avx2::Outcome outcome = s.pair_fn(pair, s.workspaces[k * size], s.workspaces[worker], team);
      s.needs_portable[(pair - s.first) * s.workspaces.size() + worker] = outcome == avx2::Outcome::kNeedsPortable;
      wait_for_team(barrier, team.workers);  // the team's next pair takes the shared workspace
    }
  }, &shared);
  pool().release(workspaces);
  if (shared.out_of_memory) throw std::bad_alloc();
  for (int64_t pair = first; pair < end; ++pair) {
    bool needs_portable = false;
    for (int32_t w = 0; w < threads; ++w) needs_portable |= shared.needs_portable[(pair - first) * threads + w] != 0;
    if (needs_portable) portable(pair);
  }
}

// All pairs of a call on the vector path: whole rounds of one pair per thread, then the
// pairs left over, fewer than the threads, by teams of threads (pairs_together) of no more
// threads than CPUs (looked up only where some pairs are left over). pair_fn(pair, shared,
// own, team) computes a pair, and portable as pairs_together takes it.
template <typename Params, typename PairFn, typename Portable>
void pairs_alone_then_together(const Params& params, PairFn&& pair_fn, Portable&& portable) {
  const int64_t pairs = params.p.pairs();
  int64_t threads = params.num_threads > 1 ? params.num_threads : 1;
  if (pairs % threads != 0) threads = std::min(threads, available_cpus());
  const int64_t alone = pairs - pairs % threads;
  if (alone > 0) {
    run_pairs(params, alone, [&](int64_t pair, avx2::Workspace* ws) {
      const avx2::Outcome outcome = pair_fn(pair, ws, ws, avx2::kAlone);
      if (outcome == avx2::Outcome::kNeedsPortable) portable(pair);
      return outcome != avx2::Outcome::kNoMemory;
    });
  }
  if (alone < pairs) pairs_together(params, alone, pairs, static_cast<int32_t>(threads), pair_fn, portable);
}

avx2::KeepCounts keep_counts(const ForwardParams& params) {
  const int64_t omega = params.p.block_size;
  const int64_t last = params.p.seqlen - (params.p.num_chunks() - 1) * omega;
  avx2::KeepCounts keep;
  keep.full = keep_count(params.keep_ratio, omega, omega);
  keep.tail = keep_count(params.keep_ratio, omega, last);
  return keep;
}

// The vector path's products for a call of this dtype ("avx2" or "avx512"), or null for the
// portable path. capability() first: a bad BSPF_CPU_CAPABILITY is an error whatever the dtype.
const avx2::Products* vector_products(DType dtype) {
  const char* path = capability();
  if (dtype != DType::kFloat32 || std::strcmp(path, "scalar") == 0) return nullptr;
#if defined(BSPF_HAVE_AVX512)
  if (std::strcmp(path, "avx512") == 0) return &avx512::kProducts;
#endif
  return &avx2::kProducts;
}

#endif  // BSPF_HAVE_AVX2

}  // namespace

const char* capability() {
  const char* forced = std::getenv("BSPF_CPU_CAPABILITY");
  if (forced && *forced) {
    for (const char* name : {"scalar", "avx2", "avx512"}) {
      if (std::strcmp(forced, name) != 0) continue;
      if (const char* why = unavailable(name))
        throw std::runtime_error(std::string("BSPF_CPU_CAPABILITY=") + name + ", but " + why +
                                 "; unset it or use 'scalar'");
      return name;
    }
    throw std::invalid_argument(std::string("BSPF_CPU_CAPABILITY must be 'scalar', 'avx2' or 'avx512', got '") +
                                forced + "'");
  }
  if (cpu_has_avx512()) return "avx512";
  return cpu_has_avx2() ? "avx2" : "scalar";
}

void mask(const ForwardParams& params) {
  validate(params, Entry::kMask);
#if defined(BSPF_HAVE_AVX2)
  if (const avx2::Products* products = vector_products(params.p.dtype)) {
    const avx2::KeepCounts keep = keep_counts(params);
    return pairs_alone_then_together(
        params,
        [&](int64_t pair, avx2::Workspace* shared, avx2::Workspace* own, const avx2::Team& team) {
          return avx2::mask_pair(params, keep, *products, pair, shared, own, team);
        },
        [](int64_t) {});  // never needed: the mask is computed in float32 whatever the logits
  }
#else
  capability();  // rejects a bad BSPF_CPU_CAPABILITY
#endif
  scalar::mask(params);
}

void forward(const ForwardParams& params) {
  validate(params, Entry::kForward);
#if defined(BSPF_HAVE_AVX2)
  if (const avx2::Products* products = vector_products(params.p.dtype)) {
    const avx2::KeepCounts keep = keep_counts(params);
    return pairs_alone_then_together(
        params,
        [&](int64_t pair, avx2::Workspace* shared, avx2::Workspace* own, const avx2::Team& team) {
          return avx2::forward_pair(params, keep, *products, pair, shared, own, team);
        },
        [&](int64_t pair) { scalar::forward_one_pair(params, pair); });
  }
#else
  capability();
#endif
  scalar::forward(params);
}

void backward(const BackwardParams& params) {
  validate(params);
#if defined(BSPF_HAVE_AVX2)
  if (const avx2::Products* products = vector_products(params.p.dtype)) {
    return pairs_alone_then_together(
        params,
        [&](int64_t pair, avx2::Workspace* shared, avx2::Workspace* own, const avx2::Team& team) {
          return avx2::backward_pair(params, *products, pair, shared, own, team);
        },
        [&](int64_t pair) { scalar::backward_one_pair(params, pair); });
  }
#else
  capability();
#endif
  scalar::backward(params);
}

}  // namespace bspf::cpu
