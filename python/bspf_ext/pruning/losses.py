"""SViT's keep-ratio losses (Eq. 2 and 3 of the paper) and its default targets.

masks: the gate decisions of the L gated layers, each (B, N) with 0/1 values carrying
the gate's gradient (GatedBlock.last_mask; `gate_masks` collects them, class token left
out), or one (L, B, N) tensor. targets: one keep ratio for all layers or one per layer.
"""

from __future__ import annotations

import numbers
from typing import List, Sequence, Union

import torch

from ._checks import describe

Masks = Union[torch.Tensor, Sequence[torch.Tensor]]


def _check(masks: Masks, targets) -> tuple:
    if isinstance(masks, torch.Tensor):
        if masks.dim() != 3:
            raise ValueError(f"masks must be a (L, B, N) tensor or a list of (B, N) tensors, got shape {tuple(masks.shape)}")
        masks = list(masks.unbind(0))
    elif isinstance(masks, (str, bytes)) or not hasattr(masks, "__iter__"):
        raise TypeError(f"masks must be a (L, B, N) tensor or a list of (B, N) tensors, got {describe(masks)}")
    else:
        masks = list(masks)
    if not masks:
        raise ValueError("masks is empty: there are no gated layers to take a keep ratio of")
    for i, m in enumerate(masks):
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or not m.is_floating_point():
            raise ValueError(f"masks[{i}] must be a floating-point (B, N) tensor, got {describe(m)}")
        if m.shape[0] != masks[0].shape[0] or m.numel() == 0:
            raise ValueError(f"masks[{i}] must be a non-empty (B, N) tensor with B = {masks[0].shape[0]}, got {tuple(m.shape)}")
    if isinstance(targets, numbers.Real) and not isinstance(targets, bool):
        targets = [float(targets)] * len(masks)
    if isinstance(targets, (str, bytes, bool)) or not hasattr(targets, "__iter__"):
        raise TypeError(f"targets must be one keep ratio or a sequence of them, got {describe(targets)}")
    targets = list(targets)
    if len(targets) != len(masks):
        raise ValueError(f"targets must be one keep ratio or one per layer ({len(masks)}), got {len(targets)}")
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"targets must be keep ratios in [0, 1], got {t!r}")
    return masks, [float(t) for t in targets]


def dynamic_keep_ratio_loss(masks: Masks, targets) -> torch.Tensor:
    """L_dynamic = 1/L Σ_l (mean over the batch and tokens of M^l − t^l)².

    The usage is averaged over the whole batch, so images may keep different numbers of
    tokens as long as the batch as a whole meets the target (SViT Eq. 2).
    """
    masks, targets = _check(masks, targets)
    terms = [(m.mean() - t).square() for m, t in zip(masks, targets)]
    return torch.stack(terms).mean()


def fixed_keep_ratio_loss(masks: Masks, targets) -> torch.Tensor:
    """L_fixed = 1/(L·B) Σ_l Σ_b (mean over tokens of M^l_b − t^l)²: every image is pushed
    to the target on its own (SViT Eq. 3, DynamicViT's ratio loss)."""
    masks, targets = _check(masks, targets)
    terms = [(m.mean(dim=1) - t).square().mean() for m, t in zip(masks, targets)]
    return torch.stack(terms).mean()


def svit_keep_targets(num_gated: int = 9, base: float = 0.7, stages: int = 3) -> List[float]:
    """SViT's default target keep ratios: `num_gated` gates split into `stages` consecutive runs (equal when they divide)
    with targets base, base², base³ … ([0.7]*3 + [0.49]*3 + [0.343]*3 for 9 gates)."""
    if isinstance(num_gated, bool) or not isinstance(num_gated, int) or num_gated < 1:
        raise ValueError(f"num_gated must be a positive int, got {describe(num_gated)}")
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= num_gated:
        raise ValueError(f"stages must be an int in [1, num_gated = {num_gated}], got {describe(stages)}")
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not 0.0 <= float(base) <= 1.0:
        raise ValueError(f"base must be a keep ratio in [0, 1], got {describe(base)}")
    return [float(base) ** (1 + i * stages // num_gated) for i in range(num_gated)]
