"""Times the CPU kernels of two builds in one process: this installation's bspf_ext._C and
another build's _C (for example the previous commit's), called on the same inputs,
interleaved round by round, with dense SDPA beside them as a common yardstick. For
refactors of csrc/cpu that must not change speed: the ratio new / old is the answer, and
running both in the same process keeps machine noise out of it.

    # the other build, e.g. of an earlier commit checked out in /tmp/old-src:
    pip install --no-build-isolation --no-deps --target /tmp/old-site \\
        -C cmake.define.BSPF_WITH_CUDA=OFF /tmp/old-src
    python benchmarks/compare_builds.py /tmp/old-site [--rounds 30]

    # both builds made the same way (recommended: an editable build, with its CUDA module
    # and its own build folder, timed ~1% apart from a --target build of the same source):
    pip install --no-build-isolation --no-deps --target /tmp/new-site \\
        -C cmake.define.BSPF_WITH_CUDA=OFF .
    python benchmarks/compare_builds.py /tmp/old-site --new-site /tmp/new-site
    python benchmarks/compare_builds.py /tmp/old-site --shape 1,1,577,64 --shape 1,3,197,64

Both builds take the same params structs (csrc/include/bspf/params.h); a build whose
structs differ cannot be compared this way.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bspf_ext
from bspf_ext import _C
from bspf_ext.ops import params
from bspf_ext.ops.geometry import box_score_kernel
from bspf_ext.ops.library import allocate_forward

SHAPES = [(8, 6, 197, 64), (4, 12, 577, 64)]


def load_other_build(site: Path, package: str = "other"):
    """The _C extension module of the build installed under `site`, as `package`._C: not as
    bspf_ext._C, so both load (the bindings are module-local), and each build under its own
    package, since Python hands a second extension module of the same name back as the first
    one (two builds loaded as "_C" both ran the first one's kernels)."""
    candidates = sorted((site / "bspf_ext").glob("_C*.so"))
    if not candidates:
        raise SystemExit(f"no bspf_ext/_C*.so under {site}")
    spec = importlib.util.spec_from_file_location(f"{package}._C", candidates[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_calls(backend, qk, v, block_size, keep_ratio, threads):
    """A forward and a backward of `backend`'s kernels at one problem, as closures."""
    scale = qk.shape[-1] ** -0.5
    weights = params.score_kernel_buffer(box_score_kernel(qk.dtype), qk.dtype)
    outputs = allocate_forward(qk, v, block_size)
    out, *saved_tensors = outputs
    saved = params.saved(backend, *saved_tensors)
    forward = params.forward_params(backend, qk, v, weights, block_size, keep_ratio, True, scale, out, saved, threads)
    backend.forward(forward)  # fills the saved buffers the backward reads
    grad_out = torch.randn_like(out)
    grad_qk, grad_v = torch.empty_like(qk), torch.empty_like(v)
    backward = params.backward_params(
        backend, grad_out, qk, v, saved, block_size, True, scale, grad_qk, grad_v, threads
    )
    # The structs hold raw pointers: the closures keep the tensors behind them alive.
    alive = (weights, outputs, grad_out, grad_qk, grad_v)
    return (lambda: backend.forward(forward) or alive), (lambda: backend.backward(backward) or alive)


def interleaved(fns: dict, rounds: int, times: dict) -> None:
    """Appends to times[name] the time of each function in `rounds` rounds of calling each
    once. The order turns by one place each round, so each follows each other equally often."""
    for fn in fns.values():
        fn()  # warm-up: scratch memory, caches
    order = list(fns)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            fns[name]()
            times.setdefault(name, []).append(time.perf_counter() - start)


def compare(new, other, qk, v, block_size, keep_ratio, threads, rounds) -> dict:
    """Median times of both builds' forward and backward and of SDPA. Half the rounds with
    the new build's buffers (and first scratch) allocated first, half with the other's:
    where a build's memory lies moved its forward by ~1.5% at 8×6×197×64 (two builds of the
    same source timed 1.014–1.016 apart, whichever was made first being the slower), and
    taking both placements evens that out."""
    times: dict = {}
    for first, second in ((("new", new), ("old", other)), (("old", other), ("new", new))):
        calls = {}
        for name, backend in (first, second):
            calls[name + "_fwd"], calls[name + "_bwd"] = kernel_calls(backend, qk, v, block_size, keep_ratio, threads)
        calls["sdpa"] = lambda: F.scaled_dot_product_attention(qk, qk, v)
        interleaved(calls, (rounds + 1) // 2, times)
        del calls
    return {name: statistics.median(t) for name, t in times.items()}


def parse_shape(text: str) -> tuple:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape is four positive integers B,H,N,D, got {text!r}")
    return shape


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other_site", type=Path, help="the folder the other build was installed into (--target)")
    parser.add_argument("--new-site", type=Path, default=None,
                        help="time this folder's build as the new one (default: the installed bspf_ext)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--shape", action="append", type=parse_shape, metavar="B,H,N,D",
                        help="a shape to time (repeatable; default: " +
                             ", ".join(",".join(map(str, shape)) for shape in SHAPES) + ")")
    args = parser.parse_args(argv)
    other = load_other_build(args.other_site)
    new = load_other_build(args.new_site, "new") if args.new_site else _C
    threads = torch.get_num_threads()
    print(f"{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}, "
          f"cpu path {new.capability()} (new) / {other.capability()} (other)")
    print("| shape | fwd new (ms) | fwd old (ms) | fwd new/old | bwd new (ms) | bwd old (ms) | bwd new/old | SDPA fwd (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shape in args.shape or SHAPES:
        gen = torch.Generator().manual_seed(0)
        qk = torch.randn(shape, generator=gen)
        v = torch.randn(shape, generator=gen)
        t = compare(new, other, qk, v, args.block_size, args.keep_ratio, threads, args.rounds)
        ms = {k: 1e3 * s for k, s in t.items()}
        print(f"| {'×'.join(map(str, shape))} | {ms['new_fwd']:.2f} | {ms['old_fwd']:.2f} | "
              f"{t['new_fwd'] / t['old_fwd']:.3f} | {ms['new_bwd']:.2f} | {ms['old_bwd']:.2f} | "
              f"{t['new_bwd'] / t['old_bwd']:.3f} | {ms['sdpa']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
