"""Where the CPU forward's time goes, by stage, in time-stamp ticks; and two source trees'
stages side by side.

Compiles tools/cpu_stages.cpp with the AVX2 path's sources of a source tree (with
-DBSPF_STAGE_TIMES, which turns on the stage marks of csrc/cpu/avx2/stage_clock.h: the
package is never built with it) and runs one-thread forwards of `--pairs` (batch, head)
pairs of random normal inputs, `--reps` times; it prints the median ticks per pair of
each stage (logits: gathering X, Xᵀ, clearing the mask words, the GEMM, the exps' shift
and the diagonal blocks' mirror; mask: scoring, the k-th score searches and the mask
words; match; exps: the upper tiles' exps and their mirror; rows: row sums, fusion and
logs; values: A·V) and of the whole call. No Python or torch runs in the timed process
and nothing else shares it, so a stage's change of a few % is resolved where the op's own
timing (benchmarks/compare_builds.py) cannot see it; but it is one thread of a stage's
code, not the op, so a change is confirmed there too.

    python tools/profile_cpu_stages.py                          # this tree, 8×6×197×64's pairs
    python tools/profile_cpu_stages.py --n 577 --reps 10
    python tools/profile_cpu_stages.py --against /tmp/old-src   # two trees, interleaved runs
    python tools/profile_cpu_stages.py --path avx2

--against takes another checkout (`git worktree add /tmp/old-src <commit>`). A tree from
before the stage marks (2026-12-07) gives its whole-call time only. The checksum of the
mask words and the output is printed per tree: equal checksums mean the same results bit
for bit. The time-stamp counter ticks at a fixed rate (2.6 GHz on the machines of
docs/performance.md), not at the core's clock. Needs g++ (or $CXX) and an x86-64 CPU with
AVX2 and FMA (AVX-512F for --path avx512, the default where the CPU has it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tools" / "cpu_stages.cpp"
# The AVX2 path's translation units the forward needs, and the flags of the package's
# build that shape their code (cmake/CompilerFlags.cmake, cmake/SimdFlags.cmake; -fPIC as
# for the extension module; its warnings are left out).
AVX2_SOURCES = ["forward", "gemm", "matching", "selection", "softmax_fusion"]
COMMON_FLAGS = ["-O3", "-std=c++17", "-fno-math-errno", "-fPIC", "-DBSPF_STAGE_TIMES"]


def cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and f" {flag}" in line for line in f)
    except OSError:
        return False


def build(tree: Path, out: Path) -> Path:
    """The harness linked against `tree`'s AVX2 path and AVX-512 products."""
    cxx = os.environ.get("CXX", "g++")
    include = [f"-I{tree / 'csrc' / 'include'}", f"-I{tree / 'csrc'}"]
    jobs, objects = [], []
    units = [(tree / "csrc" / "cpu" / "avx2" / f"{name}.cpp", ["-mavx2", "-mfma"]) for name in AVX2_SOURCES]
    units.append((tree / "csrc" / "cpu" / "avx512" / "products.cpp", ["-mavx512f", "-mavx2", "-mfma"]))
    units.append((HARNESS, []))  # baseline x86-64, as dispatch.cpp
    units.append((tree / "csrc" / "cpu" / "parallel.cpp", []))  # the team barrier the forward may wait at
    for source, flags in units:
        obj = out / f"{source.parent.name}_{source.stem}.o"
        jobs.append(subprocess.Popen([cxx, *COMMON_FLAGS, *flags, *include, "-c", str(source), "-o", str(obj)]))
        objects.append(str(obj))
    if any(job.wait() != 0 for job in jobs):
        raise SystemExit(f"building the harness against {tree} failed (see above)")
    binary = out / "cpu_stages"
    subprocess.run([cxx, *objects, "-o", str(binary), "-pthread", "-ldl"], check=True)
    return binary


def run(binary: Path, args) -> tuple[dict[str, float], str]:
    command = [str(binary), str(args.n), str(args.d), str(args.block_size), str(args.keep_ratio), str(args.pairs),
               str(args.reps), args.path, str(args.seed)]
    text = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    ticks, checksum = {}, ""
    for line in text.splitlines():
        name, value = line.split()
        if name == "checksum":
            checksum = value
        else:
            ticks[name] = float(value)
    return ticks, checksum


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=197, help="tokens N (default 197)")
    parser.add_argument("--d", type=int, default=64, help="head dimension D = Dv (default 64)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--pairs", type=int, default=48, help="distinct (batch, head) pairs per rep (default 48)")
    parser.add_argument("--reps", type=int, default=30, help="reps per run; the median is printed (default 30)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per tree, interleaved (default 3)")
    parser.add_argument("--path", choices=("avx2", "avx512"), default="avx512" if cpu_has("avx512f") else "avx2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--against", type=Path, help="another source tree, timed as 'old'")
    args = parser.parse_args(argv)
    if not (cpu_has("avx2") and cpu_has("fma")):
        parser.error("this CPU has no AVX2 and FMA: the path this tool times does not run here")
    if min(args.n, args.d, args.block_size, args.pairs, args.reps, args.rounds) < 1 or args.block_size > 64:
        parser.error("--n, --d, --pairs, --reps and --rounds must be >= 1, --block-size in [1, 64]")
    if not 0.0 <= args.keep_ratio <= 1.0:
        parser.error("--keep-ratio must be in [0, 1]")
    trees = {"new": ROOT} | ({"old": args.against.resolve()} if args.against else {})
    with tempfile.TemporaryDirectory() as work:
        binaries = {}
        for label, tree in trees.items():
            (Path(work) / label).mkdir()
            binaries[label] = build(tree, Path(work) / label)
        runs = {label: [] for label in trees}
        checksums = {}
        for _ in range(args.rounds):
            for label, binary in binaries.items():
                ticks, checksums[label] = run(binary, args)
                runs[label].append(ticks)
    stages = [name for name in runs["new"][0]]
    medians = {label: {s: statistics.median(r[s] for r in rs if s in r) for s in stages if s in rs[0]}
               for label, rs in runs.items()}
    print(f"one-thread forwards, N = {args.n}, D = {args.d}, block {args.block_size}, keep {args.keep_ratio}, "
          f"path {args.path}; median ticks per (batch, head) pair over {args.rounds} runs of {args.reps} reps "
          f"× {args.pairs} pairs")
    header = "| stage | " + " | ".join(trees) + (" | new / old |" if "old" in trees else " | share |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for stage in stages:
        cells = [f"{medians[label][stage]:.0f}" if stage in medians[label] else "—" for label in trees]
        if "old" in trees:
            old = medians["old"].get(stage)
            extra = f"{medians['new'][stage] / old:.3f}" if old else "—"
        else:
            extra = f"{100 * medians['new'][stage] / medians['new']['total']:.1f}%"
        print(f"| {stage} | " + " | ".join(cells) + f" | {extra} |")
    for label in trees:
        print(f"checksum {label}: {checksums[label]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
