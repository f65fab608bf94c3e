// Warp intrinsics of the emulated GPU, with their masks. Every lane named in a mask must
// reach the same intrinsic (with the same mask and width); a lane that has exited, waits
// at __syncthreads or at a different collective makes the launch fail with a report
// naming the intrinsic and where each lane is ("divergent shuffle"), never a hang.
//
// Memory ordering follows the PTX model: __syncwarp (and __syncthreads) order memory
// among the threads they synchronise; shuffles, votes, match and reduce do not (under
// TSan they create no happens-before).
//
// bspf_emulation::warp_exchange is the host side of warp-wide register exchanges such
// as the tensor-core fragments of csrc/cuda/mma.cuh.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bspf_emulation/scheduler.h"

namespace bspf_emulation {

// A full-warp collective: every lane passes `bytes` bytes in `mine` and receives all 32
// lanes' values, in lane order, in `all` (32 · bytes).
inline void warp_exchange(const void* mine, void* all, size_t bytes) {
  warp_collective(WarpOp::kExchange, "bspf_emulation::warp_exchange", 0xFFFFFFFFu, mine, all,
                  static_cast<unsigned>(bytes), 0, 0, Site{"(warp_exchange)", 0});
}

// The running thread's lane (threadIdx linearised, mod 32).
inline int lane_id() { return current_lane(); }

template <typename T>
inline T shuffle(WarpOp op, const char* name, unsigned mask, T var, unsigned lane_arg, int width, bool up,
                 Site site) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move values of at most 8 bytes");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width must be a power of two <= 32", site);
  // The PTX `c` operand CUDA's headers build: segment mask in bits 8..12, clamp in 0..4.
  const unsigned control = (static_cast<unsigned>(32 - width) << 8) | (up ? 0u : 0x1Fu);
  T result;
  warp_collective(op, name, mask, &var, &result, sizeof(T), lane_arg, control, site);
  return result;
}

}  // namespace bspf_emulation

constexpr int warpSize = 32;

// __builtin_FILE/__builtin_LINE as default arguments give the caller's location.
#define BSPF_EMULATION_SITE_PARAMS const char *bspf_file = __builtin_FILE(), int bspf_line = __builtin_LINE()
#define BSPF_EMULATION_SITE ::bspf_emulation::Site{bspf_file, bspf_line}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, BSPF_EMULATION_SITE_PARAMS) {
  return bspf_emulation::shuffle(bspf_emulation::WarpOp::kShflIdx, "__shfl_sync", mask, var,
                                 static_cast<unsigned>(src_lane), width, false, BSPF_EMULATION_SITE);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, BSPF_EMULATION_SITE_PARAMS) {
  return bspf_emulation::shuffle(bspf_emulation::WarpOp::kShflUp, "__shfl_up_sync", mask, var, delta, width, true,
                                 BSPF_EMULATION_SITE);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, BSPF_EMULATION_SITE_PARAMS) {
  return bspf_emulation::shuffle(bspf_emulation::WarpOp::kShflDown, "__shfl_down_sync", mask, var, delta, width,
                                 false, BSPF_EMULATION_SITE);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, BSPF_EMULATION_SITE_PARAMS) {
  return bspf_emulation::shuffle(bspf_emulation::WarpOp::kShflXor, "__shfl_xor_sync", mask, var,
                                 static_cast<unsigned>(lane_mask), width, false, BSPF_EMULATION_SITE);
}

inline unsigned __ballot_sync(unsigned mask, int predicate, BSPF_EMULATION_SITE_PARAMS) {
  const int p = predicate != 0;
  unsigned ballot;
  bspf_emulation::warp_collective(bspf_emulation::WarpOp::kBallot, "__ballot_sync", mask, &p, &ballot, 4, 0, 0,
                                  BSPF_EMULATION_SITE);
  return ballot;
}
inline int __any_sync(unsigned mask, int predicate, BSPF_EMULATION_SITE_PARAMS) {
  const int p = predicate != 0;
  unsigned ballot;
  bspf_emulation::warp_collective(bspf_emulation::WarpOp::kBallot, "__any_sync", mask, &p, &ballot, 4, 0, 0,
                                  BSPF_EMULATION_SITE);
  return ballot != 0;
}
inline int __all_sync(unsigned mask, int predicate, BSPF_EMULATION_SITE_PARAMS) {
  const int p = predicate != 0;
  unsigned ballot;
  bspf_emulation::warp_collective(bspf_emulation::WarpOp::kBallot, "__all_sync", mask, &p, &ballot, 4, 0, 0,
                                  BSPF_EMULATION_SITE);
  return ballot == mask;
}

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu, BSPF_EMULATION_SITE_PARAMS) {
  bspf_emulation::warp_collective(bspf_emulation::WarpOp::kSyncwarp, "__syncwarp", mask, nullptr, nullptr, 0, 0, 0,
                                  BSPF_EMULATION_SITE);
}

template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value, BSPF_EMULATION_SITE_PARAMS) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes 32- or 64-bit values");
  unsigned result;
  bspf_emulation::warp_collective(bspf_emulation::WarpOp::kMatchAny, "__match_any_sync", mask, &value, &result,
                                  sizeof(T), 0, 0, BSPF_EMULATION_SITE);
  return result;
}
template <typename T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred, BSPF_EMULATION_SITE_PARAMS) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_all_sync takes 32- or 64-bit values");
  unsigned result[2];
  bspf_emulation::warp_collective(bspf_emulation::WarpOp::kMatchAll, "__match_all_sync", mask, &value, result,
                                  sizeof(T), 0, 0, BSPF_EMULATION_SITE);
  *pred = static_cast<int>(result[1]);
  return result[0];
}

#define BSPF_EMULATION_REDUCE(name, Type, op)                                                                \
  inline Type name(unsigned mask, Type value, BSPF_EMULATION_SITE_PARAMS) {                                  \
    Type result;                                                                                             \
    bspf_emulation::warp_collective(bspf_emulation::WarpOp::op, #name, mask, &value, &result, 4, 0, 0,       \
                                    BSPF_EMULATION_SITE);                                                    \
    return result;                                                                                           \
  }
BSPF_EMULATION_REDUCE(__reduce_add_sync, unsigned, kReduceAddU)
BSPF_EMULATION_REDUCE(__reduce_add_sync, int, kReduceAddI)
BSPF_EMULATION_REDUCE(__reduce_min_sync, unsigned, kReduceMinU)
BSPF_EMULATION_REDUCE(__reduce_min_sync, int, kReduceMinI)
BSPF_EMULATION_REDUCE(__reduce_max_sync, unsigned, kReduceMaxU)
BSPF_EMULATION_REDUCE(__reduce_max_sync, int, kReduceMaxI)
BSPF_EMULATION_REDUCE(__reduce_and_sync, unsigned, kReduceAnd)
BSPF_EMULATION_REDUCE(__reduce_or_sync, unsigned, kReduceOr)
BSPF_EMULATION_REDUCE(__reduce_xor_sync, unsigned, kReduceXor)
#undef BSPF_EMULATION_REDUCE

// ------------------------------------------------------------------ CTA barrier

// A thread that has returned from the kernel counts as arrived (as on Volta and later);
// every live thread must wait at the same __syncthreads (same source line).
inline void __syncthreads(BSPF_EMULATION_SITE_PARAMS) {
  bspf_emulation::sync_threads(bspf_emulation::BarrierOp::kSync, 0, BSPF_EMULATION_SITE);
}
inline int __syncthreads_count(int predicate, BSPF_EMULATION_SITE_PARAMS) {
  return bspf_emulation::sync_threads(bspf_emulation::BarrierOp::kCount, predicate != 0, BSPF_EMULATION_SITE);
}
inline int __syncthreads_and(int predicate, BSPF_EMULATION_SITE_PARAMS) {
  return bspf_emulation::sync_threads(bspf_emulation::BarrierOp::kAnd, predicate != 0, BSPF_EMULATION_SITE);
}
inline int __syncthreads_or(int predicate, BSPF_EMULATION_SITE_PARAMS) {
  return bspf_emulation::sync_threads(bspf_emulation::BarrierOp::kOr, predicate != 0, BSPF_EMULATION_SITE);
}

[[noreturn]] inline void __trap(BSPF_EMULATION_SITE_PARAMS) { bspf_emulation::fail("__trap() called", BSPF_EMULATION_SITE); }

#undef BSPF_EMULATION_SITE_PARAMS
#undef BSPF_EMULATION_SITE
