"""The CPU attention workloads the benchmarks and the regression gate time.

Each workload is a zero-argument callable over fixed inputs, so every implementation
(dense SDPA, bspf_ext, the reference) is timed on the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import bspf_ext
from bspf_ext import reference
from bspf_ext.app.bench import interleaved_medians, time_call  # noqa: F401  (the suites' timing)

TARGET_SHAPE = (8, 6, 197, 64)  # DeiT-S attention: (B, H, N, D)
LONG_SHAPE = (4, 12, 577, 64)  # ViT-B at 384 px
SHAPES = [(1, 6, 197, 64), TARGET_SHAPE, (64, 6, 197, 64), LONG_SHAPE]
BLOCK_SIZES = [8, 16, 32, 64]
TARGET_BLOCK_SIZE = 16
KEEP_RATIO = 0.5
IMPLS = ("sdpa", "bspf", "reference")
MODES = ("forward", "forward_backward")

# Targets of the CPU speed issue: bspf / dense SDPA time ratios at TARGET_SHAPE (and the
# forward at LONG_SHAPE), and the speed-up over the reference.
TARGET_RATIO = {"forward": 1.0, "forward_backward": 1.0}
TARGET_LONG_FORWARD_RATIO = 1.2
TARGET_SPEEDUP_OVER_REFERENCE = 20.0


def shape_id(shape) -> str:
    return "x".join(str(s) for s in shape)


@dataclass
class Inputs:
    qk: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor


def make_inputs(shape, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    qk = torch.randn(*shape, generator=gen)
    v = torch.randn(*shape, generator=gen)
    grad_out = torch.randn(*shape, generator=gen)
    return Inputs(qk, v, grad_out)


def _attention(impl: str, block_size: int):
    if impl == "sdpa":
        return lambda qk, v: F.scaled_dot_product_attention(qk, qk, v)
    if impl == "bspf":
        return lambda qk, v: bspf_ext.block_symmetric_attention(qk, v, block_size=block_size, keep_ratio=KEEP_RATIO)
    if impl == "reference":
        return lambda qk, v: reference.block_symmetric_attention(qk, v, block_size=block_size, keep_ratio=KEEP_RATIO)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def workload(impl: str, mode: str, inputs: Inputs, block_size: int = TARGET_BLOCK_SIZE) -> Callable[[], None]:
    """A callable running `impl` ('sdpa', 'bspf', 'reference') forward or forward+backward."""
    attention = _attention(impl, block_size)
    if mode == "forward":

        def run_forward():
            with torch.no_grad():
                attention(inputs.qk, inputs.v)

        return run_forward
    if mode == "forward_backward":
        qk = inputs.qk.clone().requires_grad_()
        v = inputs.v.clone().requires_grad_()

        def run_forward_backward():
            qk.grad = v.grad = None
            attention(qk, v).backward(inputs.grad_out)

        return run_forward_backward
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
