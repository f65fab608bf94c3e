"""Argument checks shared by the pruning methods: bad input becomes a clear exception
naming the argument and what was expected."""

from __future__ import annotations

import math
import numbers

import torch

from .._validation import _describe, check_keep_ratio  # noqa: F401  (re-exported)


def check_tokens(name: str, x, *, has_class_token: bool = False) -> None:
    """A floating-point (B, N, C) token sequence (with at least the class token if it has one)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, N, C), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, N, C) (3 dimensions), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if has_class_token and x.shape[1] < 1:
        raise ValueError(f"{name} has no tokens (N = 0) but has_class_token=True expects a class token first")


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")
    return value


def check_nonnegative_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite float >= 0, got {_describe(value)}")
    out = float(value)
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {value}")
    return out


def check_positive_float(name: str, value) -> float:
    out = check_nonnegative_float(name, value)
    if out == 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value}")
    return out


def check_nonnegative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 0, got {_describe(value)}")
    if int(value) < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value}")
    return int(value)


def check_mask(name: str, mask, batch: int, tokens: int) -> torch.Tensor:
    """A (B, N) keep mask: bool, or a float of exact 0/1 values (a hard gate's output)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, N), got {type(mask).__name__}")
    if tuple(mask.shape) != (batch, tokens):
        raise ValueError(f"{name} must have shape (B, N) = {(batch, tokens)}, got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got dtype {mask.dtype}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (a hard mask), got other values")
    return mask != 0
