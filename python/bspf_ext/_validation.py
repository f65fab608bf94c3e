"""Argument checks: bad input becomes a clear ValueError/TypeError naming the argument and
what was expected, never a crash or a silently wrong answer.

The generic checks (check_int, check_float, check_bool, check_choice, check_tokens) are
shared by every public entry point of the package; the rest are the operator's own.
TypeError means the argument has the wrong kind (a str for an int, a list for a tensor);
ValueError means the right kind with a wrong value (out of range, wrong shape).
"""

from __future__ import annotations

import math
import numbers

import torch

MAX_BLOCK_SIZE = 64  # one row of a block is one 64-bit mask word

# The dtypes some kernel of the operator computes in (CPU: float32 and float64).
OP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _describe(x) -> str:
    return f"{type(x).__name__} {x!r}" if not isinstance(x, torch.Tensor) else f"tensor of shape {tuple(x.shape)}"


# ------------------------------------------------------------------ generic checks


def _range_words(kind: str, low, high, low_open: bool = False) -> str:
    """'an int >= 1', 'a finite float in [0, 1]', 'a finite float > 0', ..."""
    article = "an" if kind[0] in "aeiou" else "a"
    if low is not None and high is not None:
        return f"{article} {kind} in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f"{article} {kind} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{article} {kind} <= {high}"
    return f"{article} {kind}"


def check_int(name: str, value, *, low=None, high=None) -> int:
    """An int (a bool is not one) in [low, high]; either bound may be None."""
    expected = _range_words("int", low, high)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {_describe(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return int(value)


def check_float(name: str, value, *, low=None, high=None, low_open: bool = False) -> float:
    """A finite real number (an int is fine, a bool is not) in [low, high] ((low, high] with low_open)."""
    expected = _range_words("finite float", low, high, low_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {_describe(value)}")
    out = float(value)
    below = low is not None and (out <= low if low_open else out < low)
    if not math.isfinite(out) or below or (high is not None and out > high):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return out


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")
    return value


def check_choice(name: str, value, choices) -> str:
    """One of a fixed set of names."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {tuple(choices)}, got {_describe(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_tokens(name: str, x, *, channels: int | None = None, has_class_token: bool = False,
                 owner: str = "") -> None:
    """A floating-point (B, N, C) token sequence; C = `channels` when given; at least the
    class token if it has one. `owner` (a class name) prefixes the message."""
    prefix = f"{owner}: " if owner else ""
    shape = f"(B, N, {channels})" if channels is not None else "(B, N, C)"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{prefix}{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")
    if x.dim() != 3 or (channels is not None and x.shape[-1] != channels):
        raise ValueError(f"{prefix}{name} must have shape {shape}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{prefix}{name} must be a floating-point tensor, got dtype {x.dtype}")
    if has_class_token and x.shape[1] < 1:
        raise ValueError(f"{prefix}{name} has no tokens (N = 0) but has_class_token=True expects a class token first")


# ------------------------------------------------------------- the operator's checks


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
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {_describe(keep_ratio)}")
    value = float(keep_ratio)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {keep_ratio}")
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
    return check_bool("fuse", fuse)


def values_are_readable(t: torch.Tensor) -> bool:
    """Whether a check may look at t's values: a meta tensor has none, and reading values
    while torch.compile traces or a CUDA graph is captured would break the trace or capture
    (there, shapes and dtypes are still checked)."""
    if t.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


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
    # On CUDA this reads 9 numbers back, one synchronisation per call.
    if values_are_readable(score_kernel):
        bad = ~torch.isfinite(score_kernel) | (score_kernel < 0)
        if bool(bad.any()):
            values = ", ".join(f"{w:.4g}" for w in score_kernel.flatten().tolist())
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
