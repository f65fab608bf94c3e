"""Training-free similarity-based patch pruning.

A patch whose embedding looks like every other patch's (a uniform background) adds
little: its redundancy score is its mean cosine similarity to the other patches, and
the most redundant ones are pruned. The class token is never pruned. Optionally a
spatial-diversity term keeps the retained patches from clustering in one region.
docs/pruning.md gives the definitions and the choices made where the paper is vague.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..ops.geometry import COSINE_EPS, CPU_DTYPES, keep_count
from ._checks import (
    describe,
    check_bool,
    check_keep_ratio,
    check_nonnegative_float,
    check_nonnegative_int,
    check_positive_float,
    check_tokens,
)
from .random_pruning import RandomPatchPruning
from .tokens import gather_tokens, kept_indices

def _working(patches: torch.Tensor) -> torch.Tensor:
    # Half-precision sums over hundreds of patches lose too much; score in float32 at least.
    return patches if patches.dtype in CPU_DTYPES else patches.float()


def _unit(patches: torch.Tensor) -> torch.Tensor:
    work = _working(patches)
    return work / work.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)


def patch_similarity(patches: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity (B, P, P) of the patch embeddings (B, P, C).

    cos(x, y) = x·y / (max(|x|, eps) · max(|y|, eps)) with eps = 1e-8, so a zero patch is
    similar to nothing. Not needed for the scores (see `redundancy_scores`); kept for
    pictures and as the explicit form the scores are tested against.
    """
    check_tokens("patches", patches)
    unit = _unit(patches)
    return unit @ unit.transpose(1, 2)


def redundancy_scores(patches: torch.Tensor) -> torch.Tensor:
    """Redundancy of each patch: its mean cosine similarity to the OTHER patches, (B, P).

    Computed without the P×P similarity matrix: with unit vectors u_j = x_j / n_j and their
    sum s, Σ_{j≠i} u_i·u_j = u_i·s − u_i·u_i. That is O(P·C) instead of O(P²·C), and done
    as two matrix-vector products over x (s = Σ_j x_j / n_j, then x_i·s / n_i), so no
    normalised copy of x is made. Equals the off-diagonal row mean of `patch_similarity`
    up to rounding. A single patch has no others: its score is 0.
    """
    check_tokens("patches", patches)
    num_patches = patches.shape[1]
    work = _working(patches)
    norms = torch.linalg.vector_norm(work, dim=-1)  # (B, P)
    if num_patches < 2:
        return torch.zeros_like(norms)
    inverse = 1.0 / norms.clamp_min(COSINE_EPS)
    total = (inverse.unsqueeze(1) @ work)  # (B, 1, C): the sum of the unit vectors
    dots = (work @ total.transpose(1, 2)).squeeze(-1) * inverse  # u_i·s
    self_similarity = (norms * inverse).square()  # 1, or 0 for a zero patch
    return (dots - self_similarity) / (num_patches - 1)


def grid_positions(grid_size: Tuple[int, int], device=None) -> torch.Tensor:
    """(row, column) of every patch of an h×w grid in row-major order, (h·w, 2) float."""
    height, width = grid_size
    rows = torch.arange(height, device=device, dtype=torch.float32).repeat_interleave(width)
    cols = torch.arange(width, device=device, dtype=torch.float32).repeat(height)
    return torch.stack([rows, cols], dim=-1)


def _check_grid_size(grid_size, num_patches: int) -> Tuple[int, int]:
    if grid_size is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(
                f"the spatial-diversity term needs the patch layout: {num_patches} patches are not a square grid, "
                "so pass grid_size=(rows, cols) or positions=(B, P, 2)"
            )
        return side, side
    if (
        not isinstance(grid_size, (tuple, list))
        or len(grid_size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in grid_size)
    ):
        raise TypeError(f"grid_size must be a pair of positive ints (rows, cols), got {describe(grid_size)}")
    if grid_size[0] * grid_size[1] != num_patches:
        raise ValueError(
            f"grid_size {tuple(grid_size)} has {grid_size[0] * grid_size[1]} cells but there are {num_patches} patches"
        )
    return int(grid_size[0]), int(grid_size[1])


def _patch_positions(positions, grid_size, batch: int, num_patches: int, device) -> torch.Tensor:
    """(B or 1, P, 2) coordinates of the patches, in patch units."""
    if positions is None:
        return grid_positions(_check_grid_size(grid_size, num_patches), device=device).unsqueeze(0)
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor of shape (P, 2) or (B, P, 2), got {type(positions).__name__}")
    if positions.dim() == 2:
        positions = positions.unsqueeze(0)
    if positions.dim() != 3 or positions.shape[1:] != (num_patches, 2) or positions.shape[0] not in (1, batch):
        raise ValueError(
            f"positions must have shape (P, 2) or (B, P, 2) with P = {num_patches}, B = {batch}; "
            f"got shape {tuple(positions.shape)}"
        )
    return positions.to(device=device, dtype=torch.float32)


def _rank_ascending(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every score in its row, smallest first; ties go to the smaller index."""
    order = torch.sort(scores, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    arange = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return ranks.scatter_(1, order, arange)


def _select_diverse(scores: torch.Tensor, counts: torch.Tensor, weight: float, radius: float,
                    positions: torch.Tensor) -> torch.Tensor:
    """Greedy selection of counts[b] patches per image maximising
    (least redundant = 1, most redundant = 0) − weight · (closeness to the nearest patch already kept),
    closeness = exp(−d² / (2·radius²)) in patch units. Ties go to the smaller index."""
    batch, num_patches = scores.shape
    low = scores.min(dim=1, keepdim=True).values
    high = scores.max(dim=1, keepdim=True).values
    quality = (high - scores) / (high - low).clamp_min(torch.finfo(scores.dtype).tiny)
    distance2 = torch.cdist(positions, positions).square()
    closeness = torch.exp(-distance2 / (2.0 * radius * radius)).to(scores.dtype).expand(batch, -1, -1)
    selected = torch.zeros_like(scores, dtype=torch.bool)
    nearest = torch.zeros_like(scores)
    rows = torch.arange(batch, device=scores.device)
    for step in range(int(counts.max().item()) if batch else 0):
        active = counts > step
        objective = (quality - weight * nearest).masked_fill(selected, float("-inf"))
        pick = objective.argmax(dim=1)
        selected[rows[active], pick[active]] = True
        nearest = torch.where(active[:, None], torch.maximum(nearest, closeness[rows, pick]), nearest)
    return selected


def _check_score_tokens(score_tokens, tokens: torch.Tensor) -> torch.Tensor:
    if score_tokens is None:
        return tokens
    check_tokens("score_tokens", score_tokens)
    if score_tokens.shape[:2] != tokens.shape[:2]:
        raise ValueError(
            f"score_tokens must have the same (B, N) as tokens {tuple(tokens.shape[:2])}, "
            f"got {tuple(score_tokens.shape[:2])}"
        )
    return score_tokens


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
        raise TypeError(f"threshold must be a finite float (a redundancy score in [-1, 1]), got {describe(threshold)}")
    return float(threshold)


def _threshold_counts(scores: torch.Tensor, threshold, min_keep) -> torch.Tensor:
    """Per image: how many patches score <= threshold, at least min_keep."""
    threshold = _check_threshold(threshold)
    min_keep = min(check_nonnegative_int("min_keep", min_keep), scores.shape[1])
    return (scores <= threshold).sum(dim=1).clamp_min(min_keep)


def _keep_mask(tokens, count_rule, *, has_class_token, diversity, diversity_radius, grid_size, positions,
               score_tokens) -> torch.Tensor:
    """Bool (B, N) keep mask; count_rule maps the (B, P) redundancy scores to (B,) patch counts."""
    check_tokens("tokens", tokens, has_class_token=check_bool("has_class_token", has_class_token))
    diversity = check_nonnegative_float("diversity", diversity)
    diversity_radius = check_positive_float("diversity_radius", diversity_radius)
    score_tokens = _check_score_tokens(score_tokens, tokens)
    batch = tokens.shape[0]
    first = 1 if has_class_token else 0
    scores = redundancy_scores(score_tokens[:, first:])
    counts = count_rule(scores)
    if diversity > 0:
        patch_positions = _patch_positions(positions, grid_size, batch, scores.shape[1], tokens.device)
        keep_patches = _select_diverse(scores, counts, diversity, diversity_radius, patch_positions)
    else:
        keep_patches = _rank_ascending(scores) < counts[:, None]
    if not has_class_token:
        return keep_patches
    return torch.cat([keep_patches.new_ones(batch, 1), keep_patches], dim=1)


def _fixed_counts(keep_ratio):
    keep_ratio = check_keep_ratio(keep_ratio)
    return lambda scores: torch.full(
        (scores.shape[0],), keep_count(keep_ratio, 1, scores.shape[1]), dtype=torch.int64, device=scores.device
    )


def similarity_keep_mask(
    tokens: torch.Tensor,
    keep_ratio: Optional[float] = None,
    *,
    threshold: Optional[float] = None,
    has_class_token: bool = True,
    diversity: float = 0.0,
    diversity_radius: float = 1.0,
    grid_size: Optional[Tuple[int, int]] = None,
    positions: Optional[torch.Tensor] = None,
    min_keep: int = 1,
    score_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Bool (B, N) mask of the tokens similarity pruning keeps.

    Exactly one of:
      * keep_ratio r in [0, 1]: every image keeps k = ceil(r·P − 1e-9) of its P patches
        (the same rounding as BSPF's keep count), the k least redundant;
      * threshold t: an image keeps its patches whose redundancy score is <= t, at least
        min_keep of them (the least redundant) — so the count adapts to the content.
    The class token (index 0 when has_class_token) is always kept and never scored.
    Ties in the score go to the smaller index.

    diversity w >= 0 adds the spatial-diversity term (greedy selection, see docs); it needs
    the patch layout: grid_size=(rows, cols) (a square grid is assumed if omitted) or
    positions (P, 2) / (B, P, 2). score_tokens, if given, is scored instead of tokens
    (e.g. the patch embeddings before the position embedding was added); same shape.
    """
    if (keep_ratio is None) == (threshold is None):
        raise ValueError("give exactly one of keep_ratio (a fixed ratio) and threshold (an adaptive one)")
    if keep_ratio is not None:
        count_rule = _fixed_counts(keep_ratio)
    else:
        count_rule = lambda scores: _threshold_counts(scores, threshold, min_keep)  # noqa: E731
    return _keep_mask(
        tokens, count_rule, has_class_token=has_class_token, diversity=diversity, diversity_radius=diversity_radius,
        grid_size=grid_size, positions=positions, score_tokens=score_tokens,
    )


def similarity_prune(
    tokens: torch.Tensor,
    keep_ratio: float,
    *,
    has_class_token: bool = True,
    diversity: float = 0.0,
    diversity_radius: float = 1.0,
    grid_size: Optional[Tuple[int, int]] = None,
    positions: Optional[torch.Tensor] = None,
    score_tokens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prune the most redundant patches at a fixed ratio.

    tokens (B, N, C), class token first when has_class_token. Returns (kept tokens (B, K, C),
    kept indices (B, K) into the input, ascending), K = [1 +] ceil(keep_ratio·P − 1e-9),
    P the number of patch tokens. The class token is always kept (index 0). See
    `similarity_keep_mask` for the other arguments.
    """
    if keep_ratio is None:
        raise TypeError("keep_ratio must be a float in [0, 1], got NoneType None (use similarity_keep_mask for a threshold)")
    mask = similarity_keep_mask(
        tokens, keep_ratio, has_class_token=has_class_token, diversity=diversity,
        diversity_radius=diversity_radius, grid_size=grid_size, positions=positions, score_tokens=score_tokens,
    )
    first = 1 if has_class_token else 0
    count = first + keep_count(float(keep_ratio), 1, tokens.shape[1] - first)
    indices = kept_indices(mask, count)
    return gather_tokens(tokens, indices), indices


class SimilarityPatchPruning(nn.Module):
    """Similarity-based patch pruning as a layer: (B, N, C) → (B, K, C), class token first.

    Put it before the first block (pre-transformer pruning) or between blocks (progressive
    pruning; see SimilarityPrunedBlocks, which also tracks where the kept tokens came from).
    No parameters: training-free. The indices of the kept tokens (into this layer's input,
    ascending) of the last call are in `last_indices`.

    With a threshold the count adapts per image; a batch stays one dense tensor, so every
    image of a batch keeps the batch's largest count (its least redundant patches):
    exactly adaptive at batch size 1. `last_counts` holds each image's own count.
    """

    def __init__(
        self,
        keep_ratio: Optional[float] = None,
        *,
        threshold: Optional[float] = None,
        has_class_token: bool = True,
        diversity: float = 0.0,
        diversity_radius: float = 1.0,
        grid_size: Optional[Tuple[int, int]] = None,
        min_keep: int = 1,
    ):
        super().__init__()
        if (keep_ratio is None) == (threshold is None):
            raise ValueError("give exactly one of keep_ratio (a fixed ratio) and threshold (an adaptive one)")
        self.keep_ratio = None if keep_ratio is None else check_keep_ratio(keep_ratio)
        self.threshold = None if threshold is None else _check_threshold(threshold)
        self.has_class_token = check_bool("has_class_token", has_class_token)
        self.diversity = check_nonnegative_float("diversity", diversity)
        self.diversity_radius = check_positive_float("diversity_radius", diversity_radius)
        self.grid_size = grid_size
        self.min_keep = check_nonnegative_int("min_keep", min_keep)
        self.last_indices: Optional[torch.Tensor] = None
        self.last_counts: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        rule = f"keep_ratio={self.keep_ratio}" if self.keep_ratio is not None else f"threshold={self.threshold}"
        return f"{rule}, has_class_token={self.has_class_token}, diversity={self.diversity}"

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                score_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, N, C) → kept tokens (B, K, C); positions / score_tokens as in similarity_keep_mask."""
        if self.keep_ratio is not None:
            count_rule = _fixed_counts(self.keep_ratio)
        else:
            def count_rule(scores):
                # One dense tensor per batch: every image keeps the batch's largest count.
                self.last_counts = _threshold_counts(scores, self.threshold, self.min_keep)
                largest = self.last_counts.max() if self.last_counts.numel() else self.last_counts.new_zeros(())
                return largest.expand_as(self.last_counts)

        mask = _keep_mask(
            tokens, count_rule, has_class_token=self.has_class_token, diversity=self.diversity,
            diversity_radius=self.diversity_radius, grid_size=self.grid_size, positions=positions,
            score_tokens=score_tokens,
        )
        count = int(mask[0].sum().item()) if mask.shape[0] else 0
        indices = kept_indices(mask, count)
        if self.keep_ratio is not None:
            first = 1 if self.has_class_token else 0
            self.last_counts = torch.full((tokens.shape[0],), count - first, device=tokens.device)
        self.last_indices = indices
        return gather_tokens(tokens, indices)


def compose_indices(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Indices into the original sequence after two prunings: outer[b, inner[b, k]]."""
    return outer.gather(1, inner)


class SimilarityPrunedBlocks(nn.Module):
    """A stack of transformer blocks with similarity pruning before chosen blocks.

    keep_ratios maps a block index i (0 … len(blocks)) to the keep ratio applied to the
    patches that reach block i (i = 0: once, before the first block; i = len(blocks):
    after the last one), or to a SimilarityPatchPruning layer for full control (or a
    RandomPatchPruning layer: the random baseline). Each stage
    prunes its fraction of the patches still present. `last_indices` holds the kept
    tokens' indices into the ORIGINAL input, so the spatial-diversity term and pictures
    still know where every patch sits after several stages.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        keep_ratios,
        *,
        has_class_token: bool = True,
        diversity: float = 0.0,
        diversity_radius: float = 1.0,
        grid_size: Optional[Tuple[int, int]] = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        if not isinstance(keep_ratios, dict):
            raise TypeError(f"keep_ratios must be a dict {{block index: keep ratio}}, got {describe(keep_ratios)}")
        self.has_class_token = check_bool("has_class_token", has_class_token)
        self.grid_size = grid_size
        stages = {}
        for index, rule in keep_ratios.items():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= len(self.blocks):
                raise ValueError(f"keep_ratios keys must be block indices in [0, {len(self.blocks)}], got {index!r}")
            if not isinstance(rule, (SimilarityPatchPruning, RandomPatchPruning)):
                rule = SimilarityPatchPruning(
                    rule, has_class_token=has_class_token, diversity=diversity, diversity_radius=diversity_radius,
                )
            elif rule.has_class_token != has_class_token:
                raise ValueError(f"the pruning layer before block {index} disagrees on has_class_token")
            stages[str(index)] = rule
        self.stages = nn.ModuleDict(stages)
        self.last_indices: Optional[torch.Tensor] = None

    def _positions(self, indices: torch.Tensor, num_original_patches: int) -> Optional[torch.Tensor]:
        if all(stage.diversity == 0 for stage in self.stages.values()):
            return None
        grid = grid_positions(_check_grid_size(self.grid_size, num_original_patches), device=indices.device)
        first = 1 if self.has_class_token else 0
        return grid[indices[:, first:] - first]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        check_tokens("tokens", tokens, has_class_token=self.has_class_token)
        batch, num_tokens = tokens.shape[:2]
        first = 1 if self.has_class_token else 0
        indices = torch.arange(num_tokens, device=tokens.device).expand(batch, -1)
        for position in range(len(self.blocks) + 1):
            stage = self.stages[str(position)] if str(position) in self.stages else None
            if stage is not None:
                tokens = stage(tokens, positions=self._positions(indices, num_tokens - first))
                indices = compose_indices(indices, stage.last_indices)
            if position < len(self.blocks):
                tokens = self.blocks[position](tokens)
        self.last_indices = indices
        return tokens
