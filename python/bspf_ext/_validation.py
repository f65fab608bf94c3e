"""Argument checks for the public operator: bad input becomes a clear Python exception
naming the argument and what was expected, never a crash or a silently wrong answer."""

from __future__ import annotations

import math
import numbers

import torch

MAX_BLOCK_SIZE = 64  # one row of a block is one 64-bit mask word


def _describe(x) -> str:
    return f"{type(x).__name__} {x!r}" if not isinstance(x, torch.Tensor) else f"tensor of shape {tuple(x.shape)}"


def check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, H, N, D) (4 dimensions), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise TypeError(f"block_size must be an int in [1, {MAX_BLOCK_SIZE}], got {_describe(block_size)}")
    if not 1 <= int(block_size) <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be an int in [1, {MAX_BLOCK_SIZE}], got {block_size}")
    return int(block_size)


def check_keep_ratio(keep_ratio) -> float:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):
        raise TypeError(f"keep_ratio must be a float in [0, 1], got {_describe(keep_ratio)}")
    value = float(keep_ratio)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"keep_ratio must be a float in [0, 1], got {keep_ratio}")
    return value


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a finite float or None, got {_describe(scale)}")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite float or None, got {scale}")
    return value


def check_fuse(fuse) -> bool:
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse must be a bool, got {_describe(fuse)}")
    return fuse


def check_score_kernel(score_kernel, qk: torch.Tensor) -> None:
    if not isinstance(score_kernel, torch.Tensor):
        raise TypeError(f"score_kernel must be a (3, 3) torch.Tensor or None, got {type(score_kernel).__name__}")
    if tuple(score_kernel.shape) != (3, 3):
        raise ValueError(f"score_kernel must have shape (3, 3), got {tuple(score_kernel.shape)}")
    if score_kernel.dtype != qk.dtype:
        raise TypeError(f"score_kernel must have the dtype of qk ({qk.dtype}), got {score_kernel.dtype}")
    if score_kernel.device != qk.device:
        raise ValueError(f"score_kernel must be on the device of qk ({qk.device}), got {score_kernel.device}")


def check_qk(qk) -> None:
    check_tensor("qk", qk)
    if qk.shape[-1] < 1:
        raise ValueError(f"qk must have a head dimension D >= 1, got shape {tuple(qk.shape)}")


def check_v(v, qk: torch.Tensor) -> None:
    check_tensor("v", v)
    if tuple(v.shape[:3]) != tuple(qk.shape[:3]):
        raise ValueError(
            f"v must have shape (B, H, N, Dv) with (B, H, N) = {tuple(qk.shape[:3])} from qk, got {tuple(v.shape)}"
        )
    if v.dtype != qk.dtype:
        raise TypeError(f"v must have the dtype of qk ({qk.dtype}), got {v.dtype}")
    if v.device != qk.device:
        raise ValueError(f"v must be on the device of qk ({qk.device}), got {v.device}")
