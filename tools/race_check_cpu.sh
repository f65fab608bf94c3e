#!/usr/bin/env bash
# Threads sharing a pair (csrc/cpu/dispatch.cpp, pairs_together) under ThreadSanitizer: the
# AVX2 path's kernels and tools/cpu_teams.cpp are built with -fsanitize=thread, and one
# pair's forward, block_mask and backward are computed by teams of 2 to 4 std::threads
# against one thread, over shapes that cover chunks that do not fill 8-row bands, rows
# whose last chunk's vectors reach past the row's end, D and Dv off the vector width, and
# both vector paths. Fails on any race report and on any difference in the bits. CI runs
# it (.ci/run); about 20 seconds on 2 cores.
#
# Teams here have up to 4 workers whatever the machine's cores (the op caps a team at the
# CPUs it may run on, so on a 2-core machine the tests see teams of 2 only).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! grep -qw avx2 /proc/cpuinfo || ! grep -qw fma /proc/cpuinfo; then
  echo "race_check_cpu: this CPU has no AVX2 and FMA: no vector path to check"
  exit 0
fi
paths="avx2"
if grep -qw avx512f /proc/cpuinfo; then paths="avx2 avx512"; fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cxx="${CXX:-c++}"
flags=(-std=c++17 -O1 -g -fsanitize=thread -Icsrc -Icsrc/include)

# Each file as cmake/SimdFlags.cmake builds it: the AVX2 ones with -mavx2 -mfma, the
# AVX-512 products with -mavx512f too, the rest for baseline x86-64. Two at a time.
compile() {  # source, then its own flags
  local source="$1"
  shift
  "$cxx" "${flags[@]}" "$@" -c "$source" -o "$work/$(basename "$source" .cpp).o"
}
jobs_running=0
for source in csrc/cpu/avx2/*.cpp csrc/cpu/avx512/products.cpp csrc/cpu/parallel.cpp tools/cpu_teams.cpp; do
  case "$source" in
    csrc/cpu/avx2/*) compile "$source" -mavx2 -mfma & ;;
    csrc/cpu/avx512/*) compile "$source" -mavx512f -mavx2 -mfma & ;;
    *) compile "$source" & ;;
  esac
  jobs_running=$((jobs_running + 1))
  if [ "$jobs_running" -eq 2 ]; then
    wait -n
    jobs_running=$((jobs_running - 1))
  fi
done
while [ "$jobs_running" -gt 0 ]; do
  wait -n
  jobs_running=$((jobs_running - 1))
done
"$cxx" -fsanitize=thread "$work"/*.o -o "$work/cpu_teams" -lpthread

# N Ω D Dv: whole vectors (197/16, 577/16), chunks off the 8-row bands (61/8 is on them,
# 100/12, 33/7), last vectors past the row's end (37/7, 16/5, 53/3), one-token chunks
# (70/1), one chunk per team worker or fewer (21/2 at 4 workers, 300/64), D and Dv off
# the vector width.
shapes=(
  "197 16 64 64" "577 16 64 64" "61 8 16 16" "100 12 40 20" "33 7 8 8" "37 7 13 11"
  "16 5 8 8" "53 3 64 64" "70 1 8 8" "21 2 24 72" "300 64 32 32" "130 20 20 72"
)
runs=0
failures=0
for path in $paths; do
  for shape in "${shapes[@]}"; do
    for threads in 2 3 4; do
      for entry in forward mask backward; do
        # shellcheck disable=SC2086
        if ! output=$(TSAN_OPTIONS="halt_on_error=1 exitcode=66" "$work/cpu_teams" $entry $shape $threads $path 2>&1) ||
          [[ "$output" != *"same bits"* ]]; then
          echo "race_check_cpu: $entry $shape, $threads threads, $path:" >&2
          echo "$output" | head -40 >&2
          failures=$((failures + 1))
        fi
        runs=$((runs + 1))
      done
    done
  done
done
if [ "$failures" -ne 0 ]; then
  echo "race_check_cpu: $failures of $runs runs raced or differed" >&2
  exit 1
fi
echo "race_check_cpu: $runs runs ($paths; teams of 2-4 threads): no race, the same bits as one thread"
