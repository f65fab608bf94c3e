"""The operator's public functions: arguments checked in one pass, then the custom op."""

from __future__ import annotations

from torch import Tensor

from . import validation
from .library import block_mask_op, forward_op

__all__ = ["block_symmetric_attention", "block_mask"]


def block_symmetric_attention(
    qk: Tensor,
    v: Tensor,
    score_kernel: Tensor | None = None,
    *,
    block_size: int = 16,
    keep_ratio: float = 0.5,
    fuse: bool = True,
    scale: float | None = None,
) -> Tensor:
    """BSPF attention (SPEC §3): out (B, H, N, Dv) from shared query/key `qk` (B, H, N, D)
    and values `v` (B, H, N, Dv).

    `score_kernel` is the 3×3 smoothing kernel W used to score off-diagonal blocks (None:
    the box filter). Each off-diagonal block keeps its ceil(keep_ratio·|block|) best
    entries, decided on the upper triangle and mirrored; pruned probability is fused into
    the most similar query's row when `fuse`. `scale` defaults to D^-1/2.

    Differentiable in qk and v; the gradient for score_kernel is exactly zero (it only
    moves the discrete mask).
    """
    arguments = validation.attention_arguments(qk, v, score_kernel, block_size, keep_ratio, fuse, scale)
    return forward_op(*arguments)[0]


def block_mask(
    qk: Tensor,
    score_kernel: Tensor | None = None,
    *,
    block_size: int = 16,
    keep_ratio: float = 0.5,
    scale: float | None = None,
) -> Tensor:
    """The boolean keep mask M (B, H, N, N) the operator uses (SPEC §3.1–3.3)."""
    return block_mask_op(*validation.mask_arguments(qk, score_kernel, block_size, keep_ratio, scale))
