"""Random patch pruning: the training-free baseline for similarity pruning.

Each image keeps the same number of patches as `SimilarityPatchPruning` at the same keep
ratio (k = ceil(r·P − 1e-9) of its P patches, class token always kept, output in input
order), but which patches is drawn uniformly at random, independently per image, from a
generator seeded at construction: a module built with the same seed gives the same
selections for the same sequence of calls (`reset()` starts the sequence again).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..ops.geometry import keep_count
from ._checks import check_bool, check_int, check_keep_ratio, check_tokens
from .tokens import gather_tokens

__all__ = ["random_keep_indices", "random_prune", "RandomPatchPruning"]


def random_keep_indices(batch: int, num_tokens: int, keep_ratio: float, *, has_class_token: bool = True,
                        generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """(B, K) ascending indices of the kept tokens, K = [1 +] keep_count(r, 1, P), the patches
    drawn uniformly without replacement per image from `generator` (a CPU generator; torch's
    default one when None). The class token (index 0) is always kept."""
    keep_ratio = check_keep_ratio(keep_ratio)
    check_bool("has_class_token", has_class_token)
    first = 1 if has_class_token else 0
    patches = num_tokens - first
    count = keep_count(keep_ratio, 1, patches)
    draws = torch.rand(batch, patches, generator=generator)  # on the CPU: the same draw on any device
    chosen = torch.sort(torch.argsort(draws, dim=1)[:, :count], dim=1).values + first
    if has_class_token:
        chosen = torch.cat([torch.zeros(batch, 1, dtype=torch.int64), chosen], dim=1)
    return chosen.to(device) if device is not None else chosen


def random_prune(tokens: torch.Tensor, keep_ratio: float, *, has_class_token: bool = True,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random patch pruning of tokens (B, N, C): (kept tokens (B, K, C), kept indices (B, K)),
    the same shapes and counts as `similarity_prune` at the same keep ratio."""
    check_tokens("tokens", tokens, has_class_token=check_bool("has_class_token", has_class_token))
    indices = random_keep_indices(tokens.shape[0], tokens.shape[1], keep_ratio, has_class_token=has_class_token,
                                  generator=generator, device=tokens.device)
    return gather_tokens(tokens, indices), indices


class RandomPatchPruning(nn.Module):
    """Random patch pruning as a layer, a drop-in for `SimilarityPatchPruning(keep_ratio)`:
    (B, N, C) → (B, K, C), class token first, `last_indices` / `last_counts` as there.
    `positions` and `score_tokens` are accepted and ignored (nothing is scored)."""

    diversity = 0.0  # SimilarityPrunedBlocks asks every stage for it

    def __init__(self, keep_ratio: float, *, seed: int = 0, has_class_token: bool = True):
        super().__init__()
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.seed = check_int("seed", seed, low=0)
        self.has_class_token = check_bool("has_class_token", has_class_token)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.last_indices: Optional[torch.Tensor] = None
        self.last_counts: Optional[torch.Tensor] = None

    def reset(self) -> None:
        """Start the sequence of draws again from the seed."""
        self.generator.manual_seed(self.seed)

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}, seed={self.seed}, has_class_token={self.has_class_token}"

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                score_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        kept, indices = random_prune(tokens, self.keep_ratio, has_class_token=self.has_class_token,
                                     generator=self.generator)
        first = 1 if self.has_class_token else 0
        self.last_indices = indices
        self.last_counts = torch.full((tokens.shape[0],), indices.shape[1] - first, device=tokens.device)
        return kept
