#!/usr/bin/env bash
# The CPU op tests on a build of the CPU kernels with AddressSanitizer and
# UndefinedBehaviorSanitizer (BSPF_SANITIZE=ON, cmake/CompilerFlags.cmake). Any finding
# aborts the test process, and this script fails on it (CI runs it: .ci/run).
#
# Run it in an environment that has the package's test dependencies (CI's venv); it adds
# the build backend there. The sanitized package goes to a temporary directory put first
# on PYTHONPATH; an installed copy is left alone (an editable install of the package takes
# precedence over PYTHONPATH: the script refuses to run then). The tests' time bound is
# BSPF_SANITIZE_TIMEOUT seconds (default 600).
#
# Two things make the preloaded runtime work under Python (found 2026-12-06):
# * libstdc++ is preloaded together with libasan. ASan intercepts __cxa_throw and looks up
#   the real one with dlsym(RTLD_NEXT) when it starts; Python does not link libstdc++, so
#   without it that pointer stays null and the first C++ exception our module throws dies
#   in "AddressSanitizer: CHECK failed: asan_interceptors.cpp: real___cxa_throw != 0"
#   instead of reaching pybind11's translation into ValueError.
# * pytest runs with --capture=sys: its default capture redirects fd 2 per test and loses
#   what was written there when the process aborts, so the sanitizer's report (and that
#   CHECK failure) never appeared. (ASan's log_path would save ASan's reports, but GCC's
#   UBSan runtime, loaded beside ASan, ignores it.)
set -euo pipefail
cd "$(dirname "$0")/.."

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The build backend, for a build without isolation (CI's venv installed the package with it).
python -m pip install --quiet "scikit-build-core>=0.10" "pybind11>=2.12"
python -m pip install --quiet --no-build-isolation --no-deps --target "$work/site" \
  -C cmake.define.BSPF_SANITIZE=ON -C cmake.define.BSPF_WITH_CUDA=OFF \
  -C cmake.build-type=RelWithDebInfo -C build-dir="$work/build" .

# Python itself is not instrumented: the ASan runtime must be loaded first, and the C++
# runtime with it (above). Python and torch keep memory alive until exit by design, so
# leak reports would say nothing of ours.
cxx="${CXX:-c++}"
asan="$($cxx -print-file-name=libasan.so)"
stdcxx="$($cxx -print-file-name=libstdc++.so)"
for lib in "$asan" "$stdcxx"; do
  if [ ! -e "$lib" ]; then
    echo "sanitize_cpu: $(basename "$lib") not found (looked at '$lib')" >&2
    exit 1
  fi
done
export LD_PRELOAD="$asan $stdcxx"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1"
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"

python -c "import bspf_ext._C as C, os; assert C.__file__.startswith(os.environ['PYTHONPATH'].split(':')[0]), C.__file__; print('sanitized bspf_ext._C:', C.__file__)"
# A C++ exception thrown in the sanitized module reaches Python as ValueError.
python - <<'PY'
import bspf_ext._C as C
params = C.ForwardParams()
problem = params.p
problem.block_size = 0
params.p = problem
try:
    C.forward(params)
except ValueError as error:
    print("sanitized module: a C++ exception reaches Python as ValueError:", str(error).splitlines()[0])
else:
    raise SystemExit("sanitized module: block_size 0 was accepted")
PY

# The AVX2 and the portable path both run: test_cpu_simd and test_extreme_logits force
# each, and float64 always takes the portable one.
status=0
timeout "${BSPF_SANITIZE_TIMEOUT:-600}" python -m pytest -q -p no:cacheprovider --capture=sys \
  tests/test_ops.py tests/test_cpu_simd.py tests/test_core_validation.py \
  tests/test_extreme_logits.py tests/test_fuzz_op.py 2>&1 | tee "$work/pytest.log" || status=$?

findings=$(grep -cE "ERROR: AddressSanitizer|runtime error:|Sanitizer: CHECK failed" "$work/pytest.log" || true)
if [ "$findings" -ne 0 ]; then
  echo "sanitize_cpu: $findings sanitizer finding(s), reported above" >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "sanitize_cpu: the tests failed under the sanitizers (exit $status)" >&2
  exit "$status"
fi
echo "sanitize_cpu: no sanitizer findings"
