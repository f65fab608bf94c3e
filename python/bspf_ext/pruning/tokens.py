"""Gathering kept tokens out of a (B, N, C) sequence and scattering them back.

Images of a batch may keep different numbers of tokens; the ragged set is held as a
padded (B, K_max, C) tensor plus a validity mask, K_max the largest count.
"""

from __future__ import annotations

from typing import Tuple

import torch


def kept_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) ascending indices of the True entries of a bool (B, N) mask that has
    `count` of them in every row."""
    num_tokens = mask.shape[1]
    arange = torch.arange(num_tokens, device=mask.device).expand_as(mask)
    return torch.sort(torch.where(mask, arange, num_tokens), dim=1).values[:, :count]


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tokens[b, indices[b, k], :] as (B, K, C)."""
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def gather_kept(tokens: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept tokens of every image, left-aligned and zero-padded.

    tokens (B, N, C), mask bool (B, N). Returns (padded (B, K, C), indices (B, K) into
    tokens, ascending, valid (B, K) bool); K = the largest count in the batch. Padding
    slots hold zeros, index 0 and valid = False.
    """
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
    rows = torch.arange(tokens.shape[0], device=tokens.device).unsqueeze(1).expand_as(indices)
    return tokens.index_put((rows[valid], indices[valid]), updated[valid].to(tokens.dtype))
