#!/usr/bin/env bash
# The CUDA path checked on one GPU machine (H100/H200) without network, in at most 8
# minutes: build for sm_90, print the versions, run the CUDA tests, compute-sanitizer
# memcheck and racecheck on one representative test, and the CUDA benchmarks as one
# markdown table. Every step runs under `timeout` with its own log; a failing step does
# not stop the next one. The summary at the end gives each step's exit status, and the
# script exits 1 if any step failed.
#
#   tools/gpu_check.sh                 # writes to $OUT if set, else ./gpu_check_out
#   PYTHON=python3.12 tools/gpu_check.sh
#
# Needs python3 with a CUDA torch, pytest, hypothesis, pybind11, scikit-build-core,
# cmake and ninja, plus nvcc and compute-sanitizer (PATH, or /usr/local/cuda/bin).

# The step functions run under `timeout` through `bash -c` (export -f), where shellcheck
# cannot see them called.
# shellcheck disable=SC2317,SC2329
set -uo pipefail

out="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.." || exit 1
python="${PYTHON:-python3}"
if ! command -v nvcc > /dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  PATH="/usr/local/cuda/bin:$PATH"
fi
export python out PATH

# Budgets in seconds; 480 in all. The tests, both sanitizer runs and the FlexAttention
# warm-up run at the same time (they check correctness or compile, nothing is timed);
# the benchmark then runs alone and gets what is left, less the summary's reserve.
total_s=480
build_s=180
info_s=20
parallel_s=120
reserve_s=15
rounds=15

# The sanitizers' test: forward and backward through the kernels at N 197, block 16,
# float32 and bfloat16, fuse on and off (four tests).
sanitizer_tests="cuda and test_gradients_match_reference_autograd and 197-16 and (float32 or bfloat16)"
export sanitizer_tests rounds

times="$(mktemp -d)"
trap 'rm -rf "$times"' EXIT
names=()
declare -A pid_of budget_of status_of

start_step() {  # name budget command...: starts the command in the background under timeout
  local name=$1 budget=$2
  shift 2
  names+=("$name")
  budget_of[$name]=$budget
  echo "== $name: started, budget $budget s, log $out/$name.log"
  (
    start=$SECONDS
    timeout --kill-after=5 "$budget" "$@" > "$out/$name.log" 2>&1
    rc=$?
    echo $((SECONDS - start)) > "$times/$name"
    exit "$rc"
  ) &
  pid_of[$name]=$!
}

finish_step() {  # name: waits for the step and records its exit status
  local name=$1 rc
  wait "${pid_of[$name]}"
  rc=$?
  status_of[$name]=$rc
  if ((rc == 0)); then
    echo "== $name: ok ($(cat "$times/$name") s)"
  else
    echo "== $name: FAILED, exit $rc$( ((rc == 124)) && echo ' (timed out)') after $(cat "$times/$name") s; log tail:"
    tail -n 15 "$out/$name.log" | sed 's/^/   | /'
  fi
}

run_step() {  # name budget command...: runs the command and waits for it
  start_step "$@"
  finish_step "$1"
}

build() {
  # sm_90 only, to keep the build short; --no-index: torch and numpy must be there
  # already, and pip must not spend the budget retrying a network it does not have.
  BSPF_CUDA_ARCHITECTURES=90 "$python" -m pip install --no-build-isolation --no-index -v . || return
  # A build that quietly skipped the CUDA module would make every later step meaningless.
  "$python" -c "
from bspf_ext import _build_info as b
print('CUDA built:', b.CUDA_BUILT, 'architectures:', b.CUDA_ARCHITECTURES)
assert b.CUDA_BUILT and b.CUDA_ARCHITECTURES == '90', 'the CUDA module was not built for sm_90'
"
}

info() {
  date -u '+date: %Y-%m-%d %H:%M UTC'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo "nvidia-smi failed"
  if command -v nvcc > /dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not found"; fi
  if sanitizer_path > /dev/null; then "$(sanitizer_path)" --version | tail -n 1; else echo "compute-sanitizer: not found"; fi
  "$python" - <<'EOF'
import importlib.metadata, sys
import torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "| torch's CUDA", torch.version.cuda, "| GPU available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
for dist in ("numpy", "pytest", "hypothesis", "triton"):
    try:
        print(dist, importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        print(dist, "MISSING")
import bspf_ext
from bspf_ext import _build_info
print("bspf_ext", bspf_ext.__file__, "| CUDA built:", _build_info.CUDA_BUILT,
      "| architectures:", _build_info.CUDA_ARCHITECTURES, "| nvcc", _build_info.CUDA_COMPILER_VERSION)
if _build_info.CUDA_BUILT:
    from bspf_ext import _cuda
    print("CUDA supported by the driver:", _cuda.driver_version(), "| CUDA runtime in bspf_ext._cuda:", _cuda.runtime_version())
EOF
}

cuda_tests() {
  # Every test marked cuda, then the build and driver checks, which hold on a GPU too.
  "$python" -m pytest -q -p no:cacheprovider -m cuda tests
  local marked=$?
  "$python" -m pytest -q -p no:cacheprovider tests/test_cuda_build.py
  local build=$?
  return $((marked != 0 ? marked : build))
}

sanitizer_path() {
  local dir
  dir="$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")"
  for candidate in "$(command -v compute-sanitizer)" "$dir/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

sanitize() {  # tool: memcheck or racecheck
  local tool=$1 sanitizer
  if ! sanitizer="$(sanitizer_path)"; then
    echo "compute-sanitizer not found (PATH, next to nvcc, /usr/local/cuda/bin): $tool not run"
    return 127
  fi
  # Without torch's caching allocator every tensor is its own allocation, so memcheck
  # sees an access past a buffer's end instead of one landing in the allocator's pool.
  # --error-exitcode: a report fails the step even when the tests themselves pass.
  # pytest runs the tests in its own process, so the default target (the application
  # only) covers every CUDA call.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 86 \
    "$python" -m pytest -q -p no:cacheprovider tests/test_ops.py -k "$sanitizer_tests"
}

flex_warmup() {  # budget_s
  # Compiles FlexAttention at every shape and mode while the tests run: torch caches
  # compiled kernels on disk, so the timed run below then mostly loads them.
  "$python" benchmarks/test_bench_cuda.py --warm-only --budget-s $(($1 - 25))
}

bench() {  # budget_s
  # No new row in the last 40 s: the row in progress (compilation, warm-up, rounds) must
  # still fit. The table is rewritten after each row, so a cut-short run keeps its rows.
  "$python" benchmarks/test_bench_cuda.py --markdown "$out/bench_table.md" --rounds "$rounds" --budget-s $(($1 - 40))
}

export -f build info cuda_tests sanitizer_path sanitize flex_warmup bench

echo "gpu_check: $(pwd) at $(git rev-parse --short HEAD 2>/dev/null || echo '?'), output in $out"
run_step build "$build_s" bash -c build
if ((status_of[build] != 0)); then
  echo "   the build failed: the steps below use whatever bspf_ext is installed, if any"
fi
run_step info "$info_s" bash -c info
sed 's/^/   /' "$out/info.log"

start_step cuda-tests "$parallel_s" bash -c cuda_tests
start_step memcheck "$parallel_s" bash -c "sanitize memcheck"
start_step racecheck "$parallel_s" bash -c "sanitize racecheck"
start_step flex-warmup "$parallel_s" bash -c "flex_warmup $parallel_s"
for name in cuda-tests memcheck racecheck flex-warmup; do
  finish_step "$name"
done

bench_s=$((total_s - reserve_s - SECONDS))
if ((bench_s >= 60)); then
  run_step bench "$bench_s" bash -c "bench $bench_s"
else
  names+=(bench)
  budget_of[bench]=$bench_s
  status_of[bench]=1
  echo "== bench: not run, only $bench_s s left"
fi
if [[ -f "$out/bench_table.md" ]]; then
  echo
  cat "$out/bench_table.md"
fi

# Written to the file first, then shown: a pipe into tee would run this block in a
# subshell, and `failed` would never reach the exit below.
failed=0
{
  echo
  echo "gpu_check summary ($SECONDS s in all, budget $total_s s; logs and bench_table.md in $out)"
  printf '%-12s %-22s %8s %8s\n' step status seconds budget
  for name in "${names[@]}"; do
    rc=${status_of[$name]}
    status="ok"
    if ((rc == 124)); then
      status="timed out (124)"
    elif ((rc != 0)); then
      status="FAILED ($rc)"
    fi
    # The warm-up only fills compile caches: the benchmark reports what it could not do.
    if [[ $name == flex-warmup ]]; then
      status="$status, not counted"
    elif ((rc != 0)); then
      failed=1
    fi
    printf '%-12s %-22s %8s %8s\n' "$name" "$status" "$(cat "$times/$name" 2> /dev/null || echo -)" "${budget_of[$name]}"
  done
  if ((failed)); then
    echo "gpu_check: FAILED"
  else
    echo "gpu_check: all steps passed"
  fi
} > "$out/summary.txt"
cat "$out/summary.txt"
exit "$failed"
