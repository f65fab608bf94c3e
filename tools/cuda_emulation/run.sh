#!/usr/bin/env bash
# Builds and runs the CPU emulation of the CUDA kernels against the scalar CPU path.
#   ./run.sh [asan|tsan] [quick]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
mode="${1:-asan}"
case "$mode" in
  asan) flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined" ;;
  tsan) flags="-fsanitize=thread" ;;
  *) echo "usage: $0 [asan|tsan] [quick]" >&2; exit 2 ;;
esac
out="$(mktemp "${TMPDIR:-/tmp}/bspf_cuda_emulation_$mode.XXXXXX")"
trap 'rm -f "$out"' EXIT
g++ -std=c++20 -O1 -g $flags -I"$here/include" -I"$root/csrc/include" \
  "$here/emulate.cpp" "$root/csrc/cpu/scalar.cpp" "$root/csrc/cpu/dispatch.cpp" -lpthread -o "$out"
"$out" "${2:-}"
