// Time-stamp counts per stage of the forward, for tools/profile_cpu_stages.py. Compiled in
// only with -DBSPF_STAGE_TIMES, which the package never sets: every mark then adds the
// ticks since the previous mark of the thread to its stage. Without it a mark is nothing.
#pragma once

#ifdef BSPF_STAGE_TIMES
#include <x86intrin.h>

#include <cstdint>

namespace bspf::cpu::avx2 {

// In the order forward_pair runs them (a chunk's rows and its A·V alternate).
enum Stage { kStageStart, kStageLogits, kStageMask, kStageMatch, kStageExps, kStageRows, kStageValues, kStages };

inline thread_local uint64_t stage_ticks[kStages] = {};
inline thread_local uint64_t stage_last = 0;

inline void stage_mark(Stage stage) {
  const uint64_t now = __rdtsc();
  stage_ticks[stage] += now - stage_last;
  stage_last = now;
}

}  // namespace bspf::cpu::avx2

#define BSPF_STAGE(stage) ::bspf::cpu::avx2::stage_mark(::bspf::cpu::avx2::stage)
#else
#define BSPF_STAGE(stage) ((void)0)
#endif
