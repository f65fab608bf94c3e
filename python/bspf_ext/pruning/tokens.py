"""Gathering kept tokens out of a (B, N, C) sequence and scattering them back.

Images of a batch may keep different numbers of tokens; the ragged set is held as a
padded (B, K_max, C) tensor plus a validity mask, K_max the largest count.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .._checks import values_are_readable
from ._checks import check_int, check_mask, check_tokens


def _check_indices(name: str, indices, batch: int, num_tokens: int) -> None:
    """A (B, K) int64 tensor of token indices in [0, N)."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, K), got {type(indices).__name__}")
    if indices.dim() != 2 or indices.shape[0] != batch:
        raise ValueError(f"{name} must have shape (B, K) with B = {batch}, got {tuple(indices.shape)}")
    if indices.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor, got dtype {indices.dtype}")
    # An index out of range would be a device-side assert on CUDA: checked wherever values
    # may be read (not while compiling or capturing a graph).
    if indices.numel() and values_are_readable(indices) and not bool(((indices >= 0) & (indices < num_tokens)).all()):
        raise ValueError(f"{name} must hold token indices in [0, {num_tokens}), got values outside")


def _shape_of(x) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def kept_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) ascending indices of the True entries of a bool (B, N) mask that has
    `count` of them in every row."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool tensor of shape (B, N), got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be a bool tensor of shape (B, N), got shape {tuple(mask.shape)}")
    keep = check_mask("mask", mask, mask.shape[0], mask.shape[1])
    num_tokens = mask.shape[1]
    count = check_int("count", count, low=0, high=num_tokens)
    if keep.numel() and values_are_readable(keep) and not bool((keep.sum(dim=1) >= count).all()):
        raise ValueError(f"count ({count}) is more than some row of mask keeps")
    mask = keep
    arange = torch.arange(num_tokens, device=mask.device).expand_as(mask)
    return torch.sort(torch.where(mask, arange, num_tokens), dim=1).values[:, :count]


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tokens[b, indices[b, k], :] as (B, K, C)."""
    check_tokens("tokens", tokens)
    _check_indices("indices", indices, tokens.shape[0], tokens.shape[1])
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def gather_kept(tokens: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept tokens of every image, left-aligned and zero-padded.

    tokens (B, N, C), mask bool (B, N). Returns (padded (B, K, C), indices (B, K) into
    tokens, ascending, valid (B, K) bool); K = the largest count in the batch. Padding
    slots hold zeros, index 0 and valid = False.
    """
    check_tokens("tokens", tokens)
    mask = check_mask("mask", mask, tokens.shape[0], tokens.shape[1])
    num_tokens = mask.shape[1]
    count = int(mask.sum(dim=1).max().item()) if mask.numel() else 0
    arange = torch.arange(num_tokens, device=mask.device).expand_as(mask)
    order = torch.sort(torch.where(mask, arange, num_tokens), dim=1).values[:, :count]
    valid = order < num_tokens
    indices = order.masked_fill(~valid, 0)
    padded = gather_tokens(tokens, indices).masked_fill(~valid.unsqueeze(-1), 0)
    return padded, indices, valid


def scatter_kept(tokens: torch.Tensor, updated: torch.Tensor, indices: torch.Tensor,
                 valid: torch.Tensor) -> torch.Tensor:
    """A copy of tokens (B, N, C) with tokens[b, indices[b, k]] = updated[b, k] for every
    valid slot; the other tokens keep their features. Differentiable in both inputs."""
    check_tokens("tokens", tokens)
    _check_indices("indices", indices, tokens.shape[0], tokens.shape[1])
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != indices.shape:
        raise ValueError(f"valid must be a bool tensor of the shape of indices {tuple(indices.shape)}, got {_shape_of(valid)}")
    check_tokens("updated", updated)
    if updated.shape[:2] != indices.shape or updated.shape[2] != tokens.shape[2]:
        raise ValueError(
            f"updated must have shape (B, K, C) = {(*indices.shape, tokens.shape[2])}, got {tuple(updated.shape)}"
        )
    rows = torch.arange(tokens.shape[0], device=tokens.device).unsqueeze(1).expand_as(indices)
    return tokens.index_put((rows[valid], indices[valid]), updated[valid].to(tokens.dtype))
