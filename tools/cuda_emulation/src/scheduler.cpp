// The emulated GPU's execution: a launch runs its CTAs one after another on the calling
// OS thread; a CTA's threads are cooperative fibers (context.h) that a deterministic
// round-robin scheduler resumes in turn. A thread runs until it waits (at __syncthreads
// or a warp collective) or returns; the last thread to arrive completes the barrier or
// collective and carries on, and the others resume on the scheduler's next pass.
//
// Divergence is reported, never waited out: a lane that arrives at a warp collective
// whose mask names a lane that has exited, waits at __syncthreads or at a different
// collective; a thread that reaches __syncthreads while lanes of its warp wait for it
// in a collective, or at a different __syncthreads than the others; and, as a last
// resort, a pass in which no thread can run. The launch then fails with
// cudaErrorLaunchFailure and a report naming the intrinsic and where every lane is.
//
// Why one long file: switching, the collectives' semantics, the CTA loop and the
// kernel-side entry points all work on the scheduler's private state (the running CTA's
// threads, its open groups and barrier); split, that state would have to move to a header
// every part could change.
//
// Sanitizers: under AddressSanitizer every switch is announced with
// __sanitizer_start/finish_switch_fiber. Under ThreadSanitizer (BSPF_EMULATION_TSAN;
// this file is then compiled without -fsanitize=thread, so its own bookkeeping is
// invisible to TSan) each CUDA thread is a TSan fiber, switches carry no
// synchronisation, and happens-before comes only from what orders memory on a GPU:
// __syncthreads and __syncwarp (release on arrival, acquire on departure), the launch's
// start (host → threads) and end (threads → host). CTAs are not ordered with one
// another, so TSan also reports two CTAs writing one address.
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "bspf_emulation/scheduler.h"
#include "context.h"
#include "runtime_state.h"

#if defined(__SANITIZE_ADDRESS__)
#define BSPF_EMULATION_ASAN 1
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
void __asan_unpoison_memory_region(const volatile void* addr, size_t size);
}
#endif

#if defined(BSPF_EMULATION_TSAN)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
constexpr unsigned kTsanNoSync = 1;  // __tsan_switch_to_fiber_no_sync
#endif

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

// The dynamic shared memory of the running CTA (see cuda_runtime.h). A kernel's
// block-scope `extern ... smem[]` names bspf_emulation_smem in the kernel's innermost
// namespace, so the pointer exists under each name kernels use: bspf::cuda, an
// anonymous namespace (GCC's mangling is the same in every translation unit), one
// inside bspf::cuda, and the global namespace.
namespace bspf::cuda {
alignas(16) thread_local unsigned char (*bspf_emulation_smem)[] = nullptr;
}
alignas(16) thread_local unsigned char (*bspf_emulation_smem)[] = nullptr;
namespace bspf_emulation {
alignas(16) thread_local unsigned char (*smem_in_anonymous)[] asm("_ZN12_GLOBAL__N_119bspf_emulation_smemE") = nullptr;
alignas(16) thread_local unsigned char (*smem_in_cuda_anonymous)[] asm(
    "_ZN4bspf4cuda12_GLOBAL__N_119bspf_emulation_smemE") = nullptr;

void set_dynamic_smem(unsigned char* block) {
  auto* array = reinterpret_cast<unsigned char(*)[]>(block);
  bspf::cuda::bspf_emulation_smem = ::bspf_emulation_smem = smem_in_anonymous = smem_in_cuda_anonymous = array;
}
}  // namespace bspf_emulation

namespace bspf_emulation {
namespace {

#if defined(BSPF_EMULATION_ASAN)
constexpr size_t kStackSize = 512 * 1024;  // ASan's redzones make frames larger
#else
constexpr size_t kStackSize = 256 * 1024;
#endif
constexpr size_t kGuard = 4096;  // PROT_NONE below each stack: an overflow faults

enum class State : unsigned char { kReady, kAtBarrier, kInWarpOp, kDone };

// A happens-before token for TSan, shared by the threads of one barrier or collective.
struct SyncToken {
  char token = 0;
  int holders = 0;  // threads that still have to acquire it
};

struct Thread {
  Context context;
  char* stack = nullptr;
  void* tsan_fiber = nullptr;
  void* asan_fake_stack = nullptr;
  Index3 idx = {};
  int linear = 0, warp = 0, lane = 0;
  State state = State::kReady;
  Site site = {};            // where it waits
  const char* what = "";     // the intrinsic it waits in
  int* barrier_result = nullptr;
  SyncToken* sync = nullptr;  // to acquire when it resumes (TSan)
};

struct Group {  // a warp collective some lanes have reached
  WarpOp op;
  const char* name;
  unsigned mask, arrived, bytes, control;
  Site site;  // of the first lane
  const void* in[32];
  void* out[32];
  unsigned lane_arg[32];
  SyncToken* sync;
};

struct Warp {
  unsigned existing = 0;  // lanes the block has
  unsigned exited = 0;
  unsigned at_barrier = 0;  // lanes waiting at __syncthreads
  std::vector<Group> pending;
};

struct Barrier {
  int arrived = 0;
  BarrierOp op = BarrierOp::kSync;
  Site site = {};
  int count = 0;
  SyncToken* sync = nullptr;
};

struct Cta {
  std::vector<Thread>* threads = nullptr;
  int size = 0, live = 0;
  std::vector<Warp> warps;
  Barrier barrier;
  bool failed = false;
  std::string error;
};

// Everything below is guarded by g_launch_mutex: one launch at a time per process.
std::mutex g_launch_mutex;
Context g_scheduler;
Thread* g_current = nullptr;
Cta g_cta;
void (*g_body)(void*) = nullptr;
void* g_closure = nullptr;
std::vector<char*> g_stack_pool;  // reused across launches (not under TSan, see run_cta)
#if defined(BSPF_EMULATION_ASAN)
const void* g_scheduler_stack = nullptr;
size_t g_scheduler_stack_size = 0;
#endif
#if defined(BSPF_EMULATION_TSAN)
void* g_scheduler_fiber = nullptr;
char g_cta_start = 0, g_launch_end = 0;
#endif

// ------------------------------------------------------------------ helpers

// Byte copies the compiler cannot turn into memcpy calls: under TSan a libc call would
// be intercepted and seen as this thread touching another lane's registers.
void copy_bytes(void* dst, const void* src, size_t n) {
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  for (; n >= 8; n -= 8, d += 8, s += 8) {
    volatile uint64_t word;
    __builtin_memcpy(const_cast<uint64_t*>(&word), s, 8);
    const uint64_t w = word;
    __builtin_memcpy(d, &w, 8);
  }
  for (; n > 0; --n) *d++ = *s++;
}

void fill_undefined(void* dst, size_t n) {
  auto* d = static_cast<volatile unsigned char*>(dst);
  for (size_t i = 0; i < n; ++i) d[i] = 0xFF;
}

const char* base_name(const char* path) {
  if (path == nullptr) return "?";
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

std::string where(Site site) { return std::string(base_name(site.file)) + ":" + std::to_string(site.line); }

bool same_site(Site a, Site b) {
  return a.line == b.line && (a.file == b.file || std::strcmp(base_name(a.file), base_name(b.file)) == 0);
}

std::string hex(unsigned mask) {
  char buffer[16];
  std::snprintf(buffer, sizeof buffer, "0x%08x", mask);
  return buffer;
}

// "3, 5-9" for a set of indices (sorted).
std::string ranges(const std::vector<int>& items) {
  std::string out;
  for (size_t i = 0; i < items.size();) {
    size_t j = i;
    while (j + 1 < items.size() && items[j + 1] == items[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += std::to_string(items[i]);
    if (j > i) out += "-" + std::to_string(items[j]);
    i = j + 1;
  }
  return out;
}

std::string lanes_of(unsigned mask) {
  std::vector<int> lanes;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) lanes.push_back(l);
  return (lanes.size() == 1 ? "lane " : "lanes ") + ranges(lanes);
}

Thread& thread_at(int warp, int lane) { return (*g_cta.threads)[warp * 32 + lane]; }

// Where each lane of `mask` in `warp` is, grouped: "lanes 0-15 wait at __syncthreads
// (common.cuh:140); lane 16 has exited".
std::string describe_lanes(int warp, unsigned mask) {
  struct Entry {
    std::string text;  // after the verb
    int verb;          // 0 exist, 1 exited, 2 wait, 3 run
    std::vector<int> lanes;
  };
  std::vector<Entry> entries;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    std::string text;
    int verb = 0;
    if (!(g_cta.warps[warp].existing >> l & 1u)) {
      text = " (the block has " + std::to_string(g_cta.size) + " threads)";
    } else {
      const Thread& t = thread_at(warp, l);
      switch (t.state) {
        case State::kDone: verb = 1; break;
        case State::kAtBarrier: verb = 2, text = " at __syncthreads (" + where(t.site) + ")"; break;
        case State::kInWarpOp: verb = 2, text = std::string(" at ") + t.what + " (" + where(t.site) + ")"; break;
        case State::kReady: verb = 3; break;
      }
    }
    auto it = std::find_if(entries.begin(), entries.end(),
                           [&](const Entry& e) { return e.verb == verb && e.text == text; });
    if (it == entries.end()) {
      entries.push_back({text, verb, {}});
      it = entries.end() - 1;
    }
    it->lanes.push_back(l);
  }
  static const char* const kVerbs[4][2] = {
      {" does not exist", " do not exist"}, {" has exited", " have exited"}, {" waits", " wait"}, {" is running", " are running"}};
  std::string out;
  for (const Entry& e : entries) {
    const bool one = e.lanes.size() == 1;
    if (!out.empty()) out += "; ";
    out += (one ? "lane " : "lanes ") + ranges(e.lanes) + kVerbs[e.verb][one ? 0 : 1] + e.text;
  }
  return out;
}

std::string thread_name(const Thread& t) {
  return "thread " + std::to_string(t.linear) + " (warp " + std::to_string(t.warp) + ", lane " +
         std::to_string(t.lane) + ")";
}

// ------------------------------------------------------------- switching

void tsan_acquire_token(Thread& t) {
#if defined(BSPF_EMULATION_TSAN)
  if (t.sync != nullptr) {
    __tsan_acquire(&t.sync->token);
    if (--t.sync->holders == 0) delete t.sync;
    t.sync = nullptr;
  }
#else
  (void)t;
#endif
}

void tsan_release_token(SyncToken* token) {
#if defined(BSPF_EMULATION_TSAN)
  __tsan_release(&token->token);
#else
  (void)token;
#endif
}

SyncToken* new_token() {
#if defined(BSPF_EMULATION_TSAN)
  return new SyncToken;
#else
  return nullptr;
#endif
}

// Scheduler → thread t, until t waits, exits or fails.
void resume(Thread& t) {
  g_current = &t;
  threadIdx = uint3{t.idx.x, t.idx.y, t.idx.z};
#if defined(BSPF_EMULATION_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, t.stack, kStackSize);
#endif
#if defined(BSPF_EMULATION_TSAN)
  __tsan_switch_to_fiber(t.tsan_fiber, kTsanNoSync);
#endif
  switch_context(g_scheduler, t.context);
#if defined(BSPF_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
  g_current = nullptr;
}

// Thread t → scheduler. A thread that is done or failed (`final`) is never resumed.
void suspend(Thread& t, bool final) {
#if defined(BSPF_EMULATION_ASAN)
  __sanitizer_start_switch_fiber(final ? nullptr : &t.asan_fake_stack, g_scheduler_stack, g_scheduler_stack_size);
#endif
#if defined(BSPF_EMULATION_TSAN)
  __tsan_switch_to_fiber(g_scheduler_fiber, kTsanNoSync);
#endif
  switch_context(t.context, g_scheduler);
#if defined(BSPF_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(t.asan_fake_stack, &g_scheduler_stack, &g_scheduler_stack_size);
#endif
  (void)final;
}

// Ends the launch with `message`; in a thread, never returns.
void fail_launch(const std::string& message) {
  if (!g_cta.failed) {
    g_cta.failed = true;
    g_cta.error = message;
  }
  if (g_current != nullptr) {
    Thread& t = *g_current;
    t.state = State::kDone;
    suspend(t, true);
    std::abort();  // never resumed
  }
}

void wait(Thread& t) {
  suspend(t, false);
  tsan_acquire_token(t);
}

// ----------------------------------------------------- collective semantics

// shfl.sync's source lane (PTX ISA): b is the lane operand, c = segmask << 8 | clamp.
int shuffle_source(WarpOp op, int lane, unsigned b, unsigned c) {
  const int segmask = static_cast<int>((c >> 8) & 0x1F), clamp = static_cast<int>(c & 0x1F);
  const int bval = static_cast<int>(b & 0x1F);
  const int max_lane = (lane & segmask) | (clamp & ~segmask);
  const int min_lane = lane & segmask;
  int j = lane;
  bool ok = false;
  switch (op) {
    case WarpOp::kShflUp: j = lane - bval; ok = j >= max_lane; break;
    case WarpOp::kShflDown: j = lane + bval; ok = j <= max_lane; break;
    case WarpOp::kShflXor: j = lane ^ bval; ok = j <= max_lane; break;
    case WarpOp::kShflIdx: j = min_lane | (bval & ~segmask); ok = j <= max_lane; break;
    default: break;
  }
  return ok ? j : lane;
}

unsigned word_of(const void* p) {
  unsigned v;
  copy_bytes(&v, p, 4);
  return v;
}

bool same_bytes(const void* a, const void* b, unsigned n) {
  const auto* x = static_cast<const volatile unsigned char*>(a);
  const auto* y = static_cast<const volatile unsigned char*>(b);
  for (unsigned i = 0; i < n; ++i)
    if (x[i] != y[i]) return false;
  return true;
}

// Writes every lane's result once all lanes of g.mask have arrived.
void complete(const Group& g) {
  const unsigned mask = g.mask;
  auto each = [&](auto fn) {
    for (int l = 0; l < 32; ++l)
      if (mask >> l & 1u) fn(l);
  };
  switch (g.op) {
    case WarpOp::kShflIdx:
    case WarpOp::kShflUp:
    case WarpOp::kShflDown:
    case WarpOp::kShflXor:
      each([&](int l) {
        const int j = shuffle_source(g.op, l, g.lane_arg[l], g.control);
        if (mask >> j & 1u)
          copy_bytes(g.out[l], g.in[j], g.bytes);
        else
          fill_undefined(g.out[l], g.bytes);  // the source lane did not take part
      });
      break;
    case WarpOp::kBallot: {
      unsigned ballot = 0;
      each([&](int l) { ballot |= (word_of(g.in[l]) != 0 ? 1u : 0u) << l; });
      each([&](int l) { copy_bytes(g.out[l], &ballot, 4); });
      break;
    }
    case WarpOp::kMatchAny:
      each([&](int l) {
        unsigned same = 0;
        each([&](int k) { same |= (same_bytes(g.in[k], g.in[l], g.bytes) ? 1u : 0u) << k; });
        copy_bytes(g.out[l], &same, 4);
      });
      break;
    case WarpOp::kMatchAll: {
      bool all = true;
      const int first = __builtin_ctz(mask);
      each([&](int l) { all = all && same_bytes(g.in[l], g.in[first], g.bytes); });
      const unsigned result[2] = {all ? mask : 0u, all ? 1u : 0u};
      each([&](int l) { copy_bytes(g.out[l], result, 8); });
      break;
    }
    case WarpOp::kReduceAddU:
    case WarpOp::kReduceAddI:
    case WarpOp::kReduceMinU:
    case WarpOp::kReduceMinI:
    case WarpOp::kReduceMaxU:
    case WarpOp::kReduceMaxI:
    case WarpOp::kReduceAnd:
    case WarpOp::kReduceOr:
    case WarpOp::kReduceXor: {
      const int first = __builtin_ctz(mask);
      unsigned acc = word_of(g.in[first]);
      each([&](int l) {
        if (l == first) return;
        const unsigned v = word_of(g.in[l]);
        const int sa = static_cast<int>(acc), sv = static_cast<int>(v);
        switch (g.op) {
          case WarpOp::kReduceAddU:
          case WarpOp::kReduceAddI: acc += v; break;  // wraps, as the hardware does
          case WarpOp::kReduceMinU: acc = std::min(acc, v); break;
          case WarpOp::kReduceMinI: acc = static_cast<unsigned>(std::min(sa, sv)); break;
          case WarpOp::kReduceMaxU: acc = std::max(acc, v); break;
          case WarpOp::kReduceMaxI: acc = static_cast<unsigned>(std::max(sa, sv)); break;
          case WarpOp::kReduceAnd: acc &= v; break;
          case WarpOp::kReduceOr: acc |= v; break;
          case WarpOp::kReduceXor: acc ^= v; break;
          default: break;
        }
      });
      each([&](int l) { copy_bytes(g.out[l], &acc, 4); });
      break;
    }
    case WarpOp::kSyncwarp: break;
    case WarpOp::kExchange:
      each([&](int l) {
        auto* all = static_cast<unsigned char*>(g.out[l]);
        for (int s = 0; s < 32; ++s) {
          if (mask >> s & 1u)
            copy_bytes(all + s * g.bytes, g.in[s], g.bytes);
          else
            fill_undefined(all + s * g.bytes, g.bytes);
        }
      });
      break;
  }
}

bool orders_memory(WarpOp op) { return op == WarpOp::kSyncwarp; }

void complete_barrier() {
  Barrier& b = g_cta.barrier;
  int result = 0;
  switch (b.op) {
    case BarrierOp::kSync: result = 0; break;
    case BarrierOp::kCount: result = b.count; break;
    case BarrierOp::kAnd: result = b.count == b.arrived; break;
    case BarrierOp::kOr: result = b.count > 0; break;
  }
  for (Thread& t : *g_cta.threads) {
    if (t.state != State::kAtBarrier && &t != g_current) continue;
    if (t.barrier_result != nullptr) *t.barrier_result = result;
    t.barrier_result = nullptr;
    if (t.state == State::kAtBarrier) t.state = State::kReady;
  }
  for (Warp& w : g_cta.warps) w.at_barrier = 0;
  b.arrived = 0;
  b.count = 0;
  b.sync = nullptr;
}

// A thread returned from the kernel: it no longer holds up a barrier, and no collective
// may still be waiting for it.
void thread_exit(Thread& t) {
  Warp& w = g_cta.warps[t.warp];
  for (const Group& g : w.pending)
    if (g.mask >> t.lane & 1u)
      fail_launch("divergent " + std::string(g.name) + " at " + where(g.site) + " (mask " + hex(g.mask) + "): " +
                  thread_name(t) + " exited while " + describe_lanes(t.warp, g.arrived) + " for it");
  t.state = State::kDone;
  w.exited |= 1u << t.lane;
  --g_cta.live;
  if (g_cta.barrier.arrived > 0 && g_cta.barrier.arrived == g_cta.live) complete_barrier();
}

// First code of every fiber, on its own stack.
void fiber_main() {
#if defined(BSPF_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &g_scheduler_stack, &g_scheduler_stack_size);
#endif
#if defined(BSPF_EMULATION_TSAN)
  __tsan_acquire(&g_cta_start);
#endif
  Thread& t = *g_current;
  try {
    g_body(g_closure);
  } catch (const std::exception& e) {
    fail_launch(thread_name(t) + " threw a C++ exception: " + e.what());
  } catch (...) {
    fail_launch(thread_name(t) + " threw a C++ exception");
  }
#if defined(BSPF_EMULATION_TSAN)
  __tsan_release(&g_launch_end);
#endif
  thread_exit(t);
  suspend(t, true);
  std::abort();  // a finished thread is never resumed
}

// ------------------------------------------------------------ the CTA loop

char* new_stack() {
  void* p = mmap(nullptr, kStackSize + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) return nullptr;
  mprotect(p, kGuard, PROT_NONE);
  return static_cast<char*>(p) + kGuard;
}

void free_stack(char* stack) { munmap(stack - kGuard, kStackSize + kGuard); }

// A small deterministic generator for the shuffled schedules.
struct Rng {
  uint64_t state;
  uint64_t next() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  }
};

template <typename T>
void shuffle_in_place(std::vector<T>& items, Rng& rng) {
  for (size_t i = items.size(); i > 1; --i) std::swap(items[i - 1], items[rng.next() % i]);
}

// Runs one CTA to completion or failure. `seed` 0 resumes threads in index order on
// every pass; any other seed in a pseudo-random order, reshuffled each pass.
void run_cta(std::vector<Thread>& threads, uint64_t seed) {
  const int n = static_cast<int>(threads.size());
  g_cta.threads = &threads;
  g_cta.size = n;
  g_cta.live = n;
  g_cta.barrier = Barrier{};
  g_cta.warps.assign((n + 31) / 32, Warp{});
  for (int w = 0; w < static_cast<int>(g_cta.warps.size()); ++w) {
    const int lanes = std::min(32, n - 32 * w);
    g_cta.warps[w].existing = lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1u;
  }
  for (Thread& t : threads) {
    t.state = State::kReady;
    t.sync = nullptr;
    t.barrier_result = nullptr;
    t.asan_fake_stack = nullptr;
    make_context(t.context, t.stack, kStackSize, &fiber_main);
  }
#if defined(BSPF_EMULATION_TSAN)
  __tsan_release(&g_cta_start);  // what the host wrote (arguments, shared memory) → the threads
#endif
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  Rng rng{seed * 0x9E3779B97F4A7C15ull + 1};
  while (g_cta.live > 0 && !g_cta.failed) {
    if (seed != 0) shuffle_in_place(order, rng);
    bool ran = false;
    for (int i : order) {
      if (threads[i].state != State::kReady) continue;
      resume(threads[i]);
      ran = true;
      if (g_cta.failed) break;
    }
    if (ran || g_cta.failed) continue;
    // No thread can run: describe what everyone waits for.
    std::string report = "deadlock: no thread can run.";
    for (int w = 0; w < static_cast<int>(g_cta.warps.size()); ++w)
      for (const Group& g : g_cta.warps[w].pending)
        report += " Warp " + std::to_string(w) + ": " + g.name + " at " + where(g.site) + " (mask " + hex(g.mask) +
                  ") waits for " + describe_lanes(w, g.mask & ~g.arrived) + ".";
    if (g_cta.barrier.arrived > 0)
      report += " __syncthreads at " + where(g_cta.barrier.site) + " has " + std::to_string(g_cta.barrier.arrived) +
                " of " + std::to_string(g_cta.live) + " live threads.";
    fail_launch(report);
  }
}

// Fresh fibers for a CTA's threads: stacks from the pool, or under TSan new stacks and
// TSan fibers for every CTA (two CTAs' threads must not look like one TSan thread, and
// unmapping a stack clears TSan's record of it).
bool prepare_threads(std::vector<Thread>& threads) {
  const int n = static_cast<int>(threads.size());
#if defined(BSPF_EMULATION_TSAN)
  for (Thread& t : threads) {
    t.stack = new_stack();
    if (t.stack == nullptr) return false;
    t.tsan_fiber = __tsan_create_fiber(0);
  }
#else
  while (static_cast<int>(g_stack_pool.size()) < n) {
    char* s = new_stack();
    if (s == nullptr) return false;
    g_stack_pool.push_back(s);
  }
  for (int i = 0; i < n; ++i) threads[i].stack = g_stack_pool[i];
#endif
  return true;
}

void release_threads(std::vector<Thread>& threads, bool failed) {
#if defined(BSPF_EMULATION_TSAN)
  (void)failed;
  for (Thread& t : threads) {
    __tsan_destroy_fiber(t.tsan_fiber);
    free_stack(t.stack);
  }
#elif defined(BSPF_EMULATION_ASAN)
  // Abandoned frames leave their redzones poisoned on a stack the next launch reuses.
  if (failed)
    for (Thread& t : threads) __asan_unpoison_memory_region(t.stack, kStackSize);
#else
  (void)threads;
  (void)failed;
#endif
}

// Dynamic shared memory: exactly `bytes`, 16-byte aligned, 0xFF bytes at the start of
// every CTA. Under TSan a fresh mapping per CTA (unmapping resets TSan's shadow; a free
// would be seen as the host racing with the CTA's threads).
struct SharedMemory {
  size_t bytes;
  unsigned char* block = nullptr;
  explicit SharedMemory(size_t n) : bytes(n) {
#if !defined(BSPF_EMULATION_TSAN)
    void* p = nullptr;
    if (posix_memalign(&p, 16, bytes) == 0) block = static_cast<unsigned char*>(p);
#endif
  }
  ~SharedMemory() {
#if !defined(BSPF_EMULATION_TSAN)
    std::free(block);
#endif
  }
  bool begin_cta() {
#if defined(BSPF_EMULATION_TSAN)
    void* p = mmap(nullptr, bytes ? bytes : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    block = p == MAP_FAILED ? nullptr : static_cast<unsigned char*>(p);
#endif
    if (block == nullptr) return false;
    fill_undefined(block, bytes);
    set_dynamic_smem(block);
    return true;
  }
  void end_cta() {
    set_dynamic_smem(nullptr);
#if defined(BSPF_EMULATION_TSAN)
    munmap(block, bytes ? bytes : 1);
    block = nullptr;
#endif
  }
};

uint64_t schedule_seed() {
  const char* s = std::getenv("BSPF_EMULATION_SCHEDULE");
  return s != nullptr ? std::strtoull(s, nullptr, 10) : 0;
}

std::string shape_text(Index3 i) {
  return "(" + std::to_string(i.x) + ", " + std::to_string(i.y) + ", " + std::to_string(i.z) + ")";
}

constexpr int kInvalidConfiguration = 9, kInvalidValue = 1, kMemoryAllocation = 2, kLaunchFailure = 719;

}  // namespace

// ------------------------------------------------------- kernel-side entry points

int current_lane() { return g_current != nullptr ? g_current->lane : 0; }

void fail(const char* message, Site site) {
  if (g_current == nullptr) {
    std::fprintf(stderr, "bspf_emulation: %s at %s outside a kernel\n", message, where(site).c_str());
    std::abort();
  }
  fail_launch(thread_name(*g_current) + ": " + message + " at " + where(site));
  std::abort();
}

void warp_collective(WarpOp op, const char* name, unsigned mask, const void* in, void* out, unsigned bytes,
                     unsigned lane_arg, unsigned control, Site site) {
  if (g_current == nullptr) fail((std::string(name) + " called from host code").c_str(), site);
  Thread& me = *g_current;
  Warp& w = g_cta.warps[me.warp];
  const unsigned bit = 1u << me.lane;
  // Messages are built only when something is wrong: this runs for every shuffle.
  auto here = [&] { return std::string(name) + " at " + where(site) + " (mask " + hex(mask) + ")"; };
  if (!(mask & bit)) fail_launch(here() + ": called by " + thread_name(me) + ", which its mask does not name");
  if (mask & ~w.existing)
    fail_launch(here() + ": the mask names " + lanes_of(mask & ~w.existing) +
                ", which do not exist (the block has " + std::to_string(g_cta.size) + " threads)");
  if (mask & w.exited)
    fail_launch("divergent " + here() + " in " + thread_name(me) + ": " + describe_lanes(me.warp, mask & w.exited));
  if (mask & w.at_barrier)
    fail_launch("divergent " + here() + " in " + thread_name(me) + ": " + describe_lanes(me.warp, mask & w.at_barrier));

  auto it = std::find_if(w.pending.begin(), w.pending.end(), [&](const Group& g) { return (g.mask & mask) != 0; });
  if (it != w.pending.end()) {
    const Group& g = *it;
    if (g.mask != mask || g.op != op || g.control != control || g.bytes != bytes)
      fail_launch("divergent " + here() + " in " + thread_name(me) + ": " + describe_lanes(me.warp, g.arrived) +
                  " (mask " + hex(g.mask) + (g.control != control && g.op == op ? ", another width" : "") + ")");
  } else {
    Group g{};
    g.op = op;
    g.name = name;
    g.mask = mask;
    g.bytes = bytes;
    g.control = control;
    g.site = site;
    g.sync = orders_memory(op) ? new_token() : nullptr;
    w.pending.push_back(g);
    it = w.pending.end() - 1;
  }
  Group& g = *it;
  g.in[me.lane] = in;
  g.out[me.lane] = out;
  g.lane_arg[me.lane] = lane_arg;
  g.arrived |= bit;
  if (g.sync != nullptr) {
    tsan_release_token(g.sync);
    g.sync->holders++;
    me.sync = g.sync;
  }
  if (g.arrived != mask) {
    me.state = State::kInWarpOp;
    me.what = name;
    me.site = site;
    wait(me);
    return;
  }
  complete(g);
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && l != me.lane) thread_at(me.warp, l).state = State::kReady;
  w.pending.erase(it);
  tsan_acquire_token(me);
}

int sync_threads(BarrierOp op, int predicate, Site site) {
  if (g_current == nullptr) fail("__syncthreads called from host code", site);
  Thread& me = *g_current;
  for (const Group& g : g_cta.warps[me.warp].pending)
    if (g.mask >> me.lane & 1u)
      fail_launch("divergent " + std::string(g.name) + " at " + where(g.site) + " (mask " + hex(g.mask) + "): " +
                  thread_name(me) + " reached __syncthreads at " + where(site) + " while " +
                  describe_lanes(me.warp, g.arrived) + " for it");
  Barrier& b = g_cta.barrier;
  if (b.arrived == 0) {
    b.op = op;
    b.site = site;
    b.count = 0;
    b.sync = new_token();
  } else if (!same_site(b.site, site) || b.op != op) {
    std::vector<int> waiting;
    for (const Thread& t : *g_cta.threads)
      if (t.state == State::kAtBarrier) waiting.push_back(t.linear);
    fail_launch("divergent __syncthreads: " + thread_name(me) + " reached the one at " + where(site) + " while " +
                (waiting.size() == 1 ? "thread " : "threads ") + ranges(waiting) + " wait at " + where(b.site));
  }
  int result = 0;
  me.barrier_result = &result;
  b.count += predicate;
  b.arrived++;
  if (b.sync != nullptr) {
    tsan_release_token(b.sync);
    b.sync->holders++;
    me.sync = b.sync;
  }
  if (b.arrived == g_cta.live) {
    complete_barrier();
    tsan_acquire_token(me);
  } else {
    me.state = State::kAtBarrier;
    me.site = site;
    g_cta.warps[me.warp].at_barrier |= 1u << me.lane;
    wait(me);
  }
  return result;
}

int launch(const LaunchShape& shape, const void* kernel, void (*body)(void*), void* closure) {
  const Index3 grid = shape.grid, block = shape.block;
  const uint64_t threads_per_block = uint64_t{block.x} * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > kMaxBlockXY || block.y > kMaxBlockXY ||
      block.z > kMaxBlockZ || threads_per_block > kMaxThreadsPerBlock)
    return record_error(kInvalidConfiguration, "block shape " + shape_text(block) + " is not launchable");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > kMaxGridX || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ)
    return record_error(kInvalidConfiguration, "grid shape " + shape_text(grid) + " is not launchable");
  const size_t limit = dynamic_smem_limit(kernel);
  if (shape.dynamic_smem > limit)
    return record_error(kInvalidValue,
                        "the launch asks for " + std::to_string(shape.dynamic_smem) +
                            " bytes of dynamic shared memory, above this kernel's limit of " + std::to_string(limit) +
                            (limit < static_cast<size_t>(kSharedPerBlockOptin)
                                 ? " (cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) raises it "
                                   "up to " + std::to_string(kSharedPerBlockOptin) + ")"
                                 : ""));

  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const uint64_t seed = schedule_seed();
  std::vector<Thread> threads(threads_per_block);
  for (unsigned z = 0, i = 0; z < block.z; ++z)
    for (unsigned y = 0; y < block.y; ++y)
      for (unsigned x = 0; x < block.x; ++x, ++i) {
        Thread& t = threads[i];
        t.idx = Index3{x, y, z};
        t.linear = static_cast<int>(i);
        t.warp = static_cast<int>(i / 32);
        t.lane = static_cast<int>(i % 32);
      }
  SharedMemory shared(shape.dynamic_smem);
#if defined(BSPF_EMULATION_TSAN)
  g_scheduler_fiber = __tsan_get_current_fiber();
#endif
  g_body = body;
  g_closure = closure;
  blockDim = dim3(block.x, block.y, block.z);
  gridDim = dim3(grid.x, grid.y, grid.z);

  // CTAs in linear order, or shuffled under a schedule seed (they are independent).
  const uint64_t ctas = uint64_t{grid.x} * grid.y * grid.z;
  std::vector<uint64_t> cta_order;
  Rng rng{seed * 0xD1B54A32D192ED03ull + 7};
  if (seed != 0 && ctas <= (uint64_t{1} << 22)) {
    cta_order.resize(ctas);
    for (uint64_t i = 0; i < ctas; ++i) cta_order[i] = i;
    shuffle_in_place(cta_order, rng);
  }
  int status = 0;
  for (uint64_t k = 0; k < ctas && status == 0; ++k) {
    const uint64_t c = cta_order.empty() ? k : cta_order[k];
    blockIdx = uint3{static_cast<unsigned>(c % grid.x), static_cast<unsigned>(c / grid.x % grid.y),
                     static_cast<unsigned>(c / grid.x / grid.y)};
    if (!prepare_threads(threads) || !shared.begin_cta()) {
      status = record_error(kMemoryAllocation, "no memory for a CTA's stacks or shared memory");
      break;
    }
    g_cta.failed = false;
    g_cta.error.clear();
    run_cta(threads, seed);
    shared.end_cta();
    release_threads(threads, g_cta.failed);
    if (g_cta.failed)
      status = record_error(kLaunchFailure, "block " + shape_text(Index3{blockIdx.x, blockIdx.y, blockIdx.z}) + " of grid " +
                                                shape_text(grid) + ": " + g_cta.error);
  }
#if defined(BSPF_EMULATION_TSAN)
  __tsan_acquire(&g_launch_end);  // the threads' writes → the host
#endif
  g_cta.threads = nullptr;
  threadIdx = blockIdx = uint3{0, 0, 0};
  return status;
}

}  // namespace bspf_emulation
