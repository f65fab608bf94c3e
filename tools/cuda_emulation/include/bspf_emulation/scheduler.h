// The interface between the shim headers (cuda_runtime.h, emulated_warp.h) and the
// emulator's runtime (src/scheduler.cpp): built-in variables, the CTA barrier, warp
// collectives and kernel launch. Kernel code never calls these directly.
//
// A CTA's threads run as cooperative fibers on the launching OS thread (one CTA at a
// time), so the built-in variables (threadIdx, ..., declared in cuda_runtime.h) are
// plain globals that the scheduler sets before it resumes a thread.
#pragma once

#include <cstddef>
#include <cstdint>

namespace bspf_emulation {

struct Index3 {
  unsigned x, y, z;
};

// Where in the kernel sources a thread waits (for reports).
struct Site {
  const char* file;
  int line;
};

// ------------------------------------------------------------------ CTA barrier

enum class BarrierOp : int { kSync, kCount, kAnd, kOr };

// __syncthreads and its reducing forms; returns the reduction (0 for kSync).
int sync_threads(BarrierOp op, int predicate, Site site);

// ------------------------------------------------------------ warp collectives

enum class WarpOp : int {
  kShflIdx,
  kShflUp,
  kShflDown,
  kShflXor,
  kBallot,  // also __any_sync and __all_sync: each lane derives its result from the ballot
  kMatchAny,
  kMatchAll,
  kReduceAddU,
  kReduceAddI,
  kReduceMinU,
  kReduceMinI,
  kReduceMaxU,
  kReduceMaxI,
  kReduceAnd,
  kReduceOr,
  kReduceXor,
  kSyncwarp,
  kExchange,
};

// One warp collective. The lanes named in `mask` must all arrive at the same operation
// (same op, `control` and `bytes`); when the last one arrives, every lane's `out` is
// written:
//   shuffles: `bytes` (≤ 8) bytes of the source lane's `in`, chosen by `lane_arg` (the
//             source lane, delta or lane mask) and `control` (the PTX clamp/segment
//             word); a source lane outside `mask` yields 0xFF bytes (undefined on a GPU);
//   kBallot:  the 32-bit ballot of the lanes' `in` (an int predicate);
//   match:    `in` is a 4- or 8-byte value; out is the 32-bit mask of equal lanes (for
//             kMatchAll, the mask if all are equal, else 0, then an int flag);
//   reduce:   `in` and `out` are 32-bit;
//   kExchange: out is 32 × bytes, every lane's `in` in lane order (0xFF bytes for lanes
//             outside `mask`).
// `name` is the CUDA intrinsic's name, for reports.
void warp_collective(WarpOp op, const char* name, unsigned mask, const void* in, void* out, unsigned bytes,
                     unsigned lane_arg, unsigned control, Site site);

// Lane of the running thread inside its warp.
int current_lane();

// Reports an error in kernel code (e.g. __trap, a bad intrinsic argument): the launch
// fails with `message` and the thread never resumes.
[[noreturn]] void fail(const char* message, Site site);

// ---------------------------------------------------------------------- launch

struct LaunchShape {
  Index3 grid;
  Index3 block;
  size_t dynamic_smem;
  void* stream;
};

// Runs body(closure) on every thread of every CTA of the grid. Returns a cudaError_t
// value (0 on success); the detailed message of a failure is kept for
// cudaGetErrorString. `kernel` identifies the function for its shared-memory limit.
int launch(const LaunchShape& shape, const void* kernel, void (*body)(void*), void* closure);

}  // namespace bspf_emulation
