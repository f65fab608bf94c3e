"""Argument checks of the pruning methods: the package's generic checks (bspf_ext._checks)
under the names the pruning code uses, plus the (B, N) keep-mask check of its own."""

from __future__ import annotations

import torch

from .._checks import check_bool, check_float, check_int, check_tokens, describe  # noqa: F401
from ..ops.validation import check_keep_ratio  # noqa: F401


def check_nonnegative_float(name: str, value) -> float:
    return check_float(name, value, low=0)


def check_positive_float(name: str, value) -> float:
    return check_float(name, value, low=0, low_open=True)


def check_nonnegative_int(name: str, value) -> int:
    return check_int(name, value, low=0)


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
