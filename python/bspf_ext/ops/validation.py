"""The operator's argument checks, run in one pass (`attention_arguments`,
`mask_arguments`) before any op is called: a wrong argument is a ValueError/TypeError naming it, on every device (meta
included), before a kernel could crash on it."""

from __future__ import annotations

import math
import numbers

import torch

from .._checks import check_bool, check_int, describe, values_are_readable
from . import backends
from .geometry import CPU_DTYPES, MAX_BLOCK_SIZE, OP_DTYPES, box_score_kernel


def check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, H, N, D) (4 dimensions), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype not in OP_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got dtype {x.dtype}")


def check_block_size(block_size) -> int:
    return check_int("block_size", block_size, low=1, high=MAX_BLOCK_SIZE)


def check_keep_ratio(keep_ratio, name: str = "keep_ratio") -> float:
    if type(keep_ratio) is not float and (isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real)):
        raise TypeError(f"{name} must be a float in [0, 1], got {describe(keep_ratio)}")
    value = float(keep_ratio)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {keep_ratio}")
    return value


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if type(scale) is not float and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a finite float or None, got {describe(scale)}")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite float or None, got {scale}")
    return value


def check_fuse(fuse) -> bool:
    return check_bool("fuse", fuse)


def check_score_kernel(score_kernel, qk: torch.Tensor) -> None:
    if not isinstance(score_kernel, torch.Tensor):
        raise TypeError(f"score_kernel must be a (3, 3) torch.Tensor or None, got {type(score_kernel).__name__}")
    if tuple(score_kernel.shape) != (3, 3):
        raise ValueError(f"score_kernel must have shape (3, 3), got {tuple(score_kernel.shape)}")
    if score_kernel.dtype != qk.dtype:
        raise TypeError(f"score_kernel must have the dtype of qk ({qk.dtype}), got {score_kernel.dtype}")
    if score_kernel.device != qk.device:
        raise ValueError(f"score_kernel must be on the device of qk ({qk.device}), got {score_kernel.device}")
    # A NaN weight makes every score NaN (the mask would be the index order, not a choice),
    # and a negative one rewards a neighbour's low logit: both are wrong answers, not errors.
    # The 9 numbers are read back in one op and checked in Python (on CUDA, one
    # synchronisation per call): a chain of elementwise ops here cost ~2% of a CPU call at
    # the target shape, run right after the previous call's kernel has taken the caches.
    if values_are_readable(score_kernel):
        weights = [w for row in score_kernel.tolist() for w in row]
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            values = ", ".join(f"{w:.4g}" for w in weights)
            raise ValueError(f"score_kernel must hold finite weights >= 0 (a 3×3 smoothing kernel), got [{values}]")


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


def check_device(qk: torch.Tensor) -> None:
    """The device and dtype have a kernel in this installation."""
    if qk.device.type == "meta":
        return  # shapes only: the fake implementation answers (deferred init, FLOP counting)
    if qk.device.type == "cpu":
        if qk.dtype not in CPU_DTYPES:
            raise TypeError(
                f"qk on CPU must be float32 or float64 (the CPU kernels' types), got {qk.dtype}; "
                "upcast it, or run on CUDA for float16/bfloat16"
            )
    elif qk.device.type == "cuda":
        backends.require_cuda()
    else:
        raise ValueError(f"qk must be on a cpu, cuda or meta device, got {qk.device}")


def score_kernel_or_box(score_kernel, qk: torch.Tensor) -> torch.Tensor:
    if score_kernel is None:
        return box_score_kernel(qk.dtype, qk.device)
    check_score_kernel(score_kernel, qk)
    return score_kernel


def attention_arguments(qk, v, score_kernel, block_size, keep_ratio, fuse, scale) -> tuple:
    """Every argument of bspf_ext::forward checked, in one pass; returns them normalised
    (the box kernel for None, D^-1/2 for a None scale, Python scalars)."""
    check_qk(qk)
    check_v(v, qk)
    block_size = check_block_size(block_size)
    keep_ratio = check_keep_ratio(keep_ratio)
    fuse = check_fuse(fuse)
    scale = check_scale(scale, qk.shape[-1])
    kernel = score_kernel_or_box(score_kernel, qk)
    check_device(qk)
    return qk, v, kernel, block_size, keep_ratio, fuse, scale


def mask_arguments(qk, score_kernel, block_size, keep_ratio, scale) -> tuple:
    """Every argument of bspf_ext::block_mask checked, in one pass, and normalised."""
    check_qk(qk)
    block_size = check_block_size(block_size)
    keep_ratio = check_keep_ratio(keep_ratio)
    scale = check_scale(scale, qk.shape[-1])
    kernel = score_kernel_or_box(score_kernel, qk)
    check_device(qk)
    return qk, kernel, block_size, keep_ratio, scale


def check_score_kernel_grad_inputs(grad_out, qk, v, score_kernel) -> None:
    """What bspf_ext::score_kernel_grad's kernels read beyond the forward's own buffers: the
    output gradient and W, shaped as the forward's (its values were checked there)."""
    if tuple(score_kernel.shape) != (3, 3):
        raise ValueError(f"score_kernel must have shape (3, 3), got {tuple(score_kernel.shape)}")
    if tuple(grad_out.shape) != tuple(v.shape):
        raise ValueError(f"grad_out must have shape {tuple(v.shape)} (that of v), got {tuple(grad_out.shape)}")
    for name, t in (("grad_out", grad_out), ("v", v), ("score_kernel", score_kernel)):
        if t.dtype != qk.dtype or t.device != qk.device:
            raise TypeError(f"{name} must have the dtype and device of qk ({qk.dtype}, {qk.device}), "
                            f"got {t.dtype}, {t.device}")
