"""Generic argument checks shared by every public entry point of the package: bad input
becomes a clear ValueError/TypeError naming the argument and what was expected, never a
crash or a silently wrong answer. The operator's own checks are in ops/validation.py.

TypeError means the argument has the wrong kind (a str for an int, a list for a tensor);
ValueError means the right kind with a wrong value (out of range, wrong shape).
"""

from __future__ import annotations

import math
import numbers

import torch

def describe(x) -> str:
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
    # The words of the message are built only for an error, and a plain int skips the ABC
    # check: the operator checks its arguments on every call (docs/performance.md).
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be {_range_words('int', low, high)}, got {describe(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {_range_words('int', low, high)}, got {value}")
    return int(value)


def check_float(name: str, value, *, low=None, high=None, low_open: bool = False) -> float:
    """A finite real number (an int is fine, a bool is not) in [low, high] ((low, high] with low_open)."""
    expected = _range_words("finite float", low, high, low_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {describe(value)}")
    out = float(value)
    below = low is not None and (out <= low if low_open else out < low)
    if not math.isfinite(out) or below or (high is not None and out > high):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return out


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")
    return value


def check_choice(name: str, value, choices) -> str:
    """One of a fixed set of names."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {tuple(choices)}, got {describe(value)}")
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


def values_are_readable(t: torch.Tensor) -> bool:
    """Whether a check may look at t's values: a meta tensor has none, and reading values
    while torch.compile traces or a CUDA graph is captured would break the trace or capture
    (there, shapes and dtypes are still checked)."""
    if t.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())
