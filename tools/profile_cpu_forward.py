"""Where the CPU forward's (or backward's) time goes, by kernel function.

Builds the CPU module with its symbols (a wheel's is stripped) into a directory, runs
one-thread forwards (or backwards, on one forward's saved buffers) at a shape under
`perf record -e cpu-clock` (a software clock: it works in a VM without hardware
counters), and prints each function's share of the samples that fell in the kernels,
largest first. The split is what the "where the time goes" lines of
docs/performance.md quote.

    python tools/profile_cpu_forward.py                        # 8,6,197,64, 1500 calls
    python tools/profile_cpu_forward.py --shape 4,12,577,64 --calls 200
    python tools/profile_cpu_forward.py --backward --calls 800
    BSPF_CPU_CAPABILITY=avx2 python tools/profile_cpu_forward.py --site /tmp/bspf-symbols

Needs perf and the build backend (scikit-build-core, pybind11) in this environment. The
symbol build goes to --site (reused when it is there: delete it after changing csrc/).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = "_C.cpython"  # the CPU module's file name starts so


def build(site: Path) -> None:
    """The package with an unstripped CPU module (pybind11 strips Release builds), no CUDA.
    -O3 comes from cmake/CompilerFlags.cmake whatever the build type."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps",
         "--target", str(site), "-Cinstall.strip=false", "-Ccmake.build-type=RelWithDebInfo",
         "-Ccmake.define.BSPF_WITH_CUDA=OFF", f"-Cbuild-dir={site}.build", str(ROOT)],
        check=True,
    )


def run_calls(site: Path, shape: tuple[int, ...], calls: int, backward: bool) -> None:
    """The profiled process: bspf_ext from `site`, whatever else is installed. An editable
    install's import hook would win over sys.path, so it is taken out first."""
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                        and "scikit" not in type(f).__module__.lower()]
    sys.path.insert(0, str(site))
    import torch

    import bspf_ext
    from bspf_ext.ops.cpu import _backward_cpu, forward_cpu
    from bspf_ext.ops.geometry import box_score_kernel

    if not bspf_ext.__file__.startswith(str(site)):
        raise SystemExit(f"bspf_ext was imported from {bspf_ext.__file__}, not from {site}")
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    qk, v = (torch.randn(*shape, generator=generator) for _ in range(2))
    kernel = box_score_kernel()
    scale = shape[-1] ** -0.5
    if not backward:
        for _ in range(calls):
            forward_cpu(qk, v, kernel, 16, 0.5, True, scale)
        return
    _, *saved = forward_cpu(qk, v, kernel, 16, 0.5, True, scale)
    grad_out = torch.randn(*shape, generator=generator)
    for _ in range(calls):
        _backward_cpu(grad_out, qk, v, *saved, 16, True, scale)


def report(data: Path, top: int) -> list[tuple[float, str]]:
    """(share of the kernels' samples in %, function), largest first."""
    text = subprocess.run(
        ["perf", "report", "-i", str(data), "--sort", "dso,symbol", "--stdio"],
        check=True, capture_output=True, text=True,
    ).stdout
    shares: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[\.\]\s+(.*)", line)
        if match and match.group(2).startswith(MODULE):
            # The name ends where perf's padding starts; a function's clones (GCC's
            # .constprop and the like) demangle to one name and are summed.
            name = re.split(r"\s{2,}", match.group(3).strip())[0]
            shares[name] = shares.get(name, 0.0) + float(match.group(1))
    total = sum(shares.values()) or 1.0
    rows = sorted(((100.0 * share / total, name) for name, share in shares.items()), reverse=True)
    return [row for row in rows[:top] if row[0] >= 0.05]  # not the bindings' stray samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8,6,197,64", help="B,H,N,D (default 8,6,197,64)")
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "bspf-symbols")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--backward", action="store_true", help="profile the backward instead")
    parser.add_argument("--run-calls", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    if len(shape) != 4 or min(shape) < 1:
        parser.error(f"--shape must be four positive integers B,H,N,D, got {args.shape!r}")
    if args.run_calls:
        run_calls(args.site, shape, args.calls, args.backward)
        return 0

    if not (args.site / "bspf_ext").is_dir():
        build(args.site)
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "perf.data"
        subprocess.run(
            ["perf", "record", "-q", "-e", "cpu-clock", "-F", "4000", "-o", str(data), sys.executable,
             __file__, "--run-calls", "--shape", args.shape, "--calls", str(args.calls), "--site", str(args.site)]
            + (["--backward"] if args.backward else []),
            check=True, env=os.environ,
        )
        rows = report(data, args.top)
    print(f"one-thread {'backwards' if args.backward else 'forwards'} at {args.shape}, "
          f"path {os.environ.get('BSPF_CPU_CAPABILITY', 'default')}; "
          "share of the samples in the kernels:")
    for share, name in rows:
        print(f"{share:6.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
