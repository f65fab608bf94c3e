"""Times the CPU kernels of two builds in one process: this installation's bspf_ext._C and
another build's _C (for example the previous commit's), called on the same inputs,
interleaved round by round, with dense SDPA beside them as a common yardstick. For
refactors of csrc/cpu that must not change speed: the ratio new / old is the answer, and
running both in the same process keeps machine noise out of it.

    # the other build, e.g. of an earlier commit checked out in /tmp/old-src:
    pip install --no-build-isolation --no-deps --target /tmp/old-site \\
        -C cmake.define.BSPF_WITH_CUDA=OFF /tmp/old-src
    python benchmarks/compare_builds.py /tmp/old-site [--rounds 30]

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


def load_other_build(site: Path):
    """The _C extension module of the build installed under `site` (not as bspf_ext._C, so
    both load; the bindings are module-local)."""
    candidates = sorted((site / "bspf_ext").glob("_C*.so"))
    if not candidates:
        raise SystemExit(f"no bspf_ext/_C*.so under {site}")
    spec = importlib.util.spec_from_file_location("_C", candidates[0])
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


def interleaved(fns: dict, rounds: int) -> dict:
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up: scratch memory, caches
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other_site", type=Path, help="the folder the other build was installed into (--target)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    args = parser.parse_args(argv)
    other = load_other_build(args.other_site)
    threads = torch.get_num_threads()
    print(f"{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}, "
          f"cpu path {bspf_ext.cpu_capability()} (this build) / {other.capability()} (other)")
    print("| shape | fwd new (ms) | fwd old (ms) | fwd new/old | bwd new (ms) | bwd old (ms) | bwd new/old | SDPA fwd (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shape in SHAPES:
        gen = torch.Generator().manual_seed(0)
        qk = torch.randn(shape, generator=gen)
        v = torch.randn(shape, generator=gen)
        new_fwd, new_bwd = kernel_calls(_C, qk, v, args.block_size, args.keep_ratio, threads)
        old_fwd, old_bwd = kernel_calls(other, qk, v, args.block_size, args.keep_ratio, threads)
        t = interleaved(
            {"new_fwd": new_fwd, "old_fwd": old_fwd, "new_bwd": new_bwd, "old_bwd": old_bwd,
             "sdpa": lambda: F.scaled_dot_product_attention(qk, qk, v)},
            args.rounds,
        )
        ms = {k: 1e3 * s for k, s in t.items()}
        print(f"| {'×'.join(map(str, shape))} | {ms['new_fwd']:.2f} | {ms['old_fwd']:.2f} | "
              f"{t['new_fwd'] / t['old_fwd']:.3f} | {ms['new_bwd']:.2f} | {ms['old_bwd']:.2f} | "
              f"{t['new_bwd'] / t['old_bwd']:.3f} | {ms['sdpa']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
