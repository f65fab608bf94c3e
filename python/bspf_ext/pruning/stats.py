"""Collecting SViT gate decisions and the usage statistics the paper reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Union

import torch
from torch import nn

from .gating import GatedBlock


def gate_masks(model: nn.Module, *, include_class_token: bool = False) -> List[torch.Tensor]:
    """The last decisions of every GatedBlock in `model`, in module order (block order for a
    ViT), each (B, N) with 0/1 values — in training still carrying the gate's gradient, so
    they can go straight into the keep-ratio losses. The class token, always kept, is left
    out unless include_class_token."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module holding GatedBlocks, got {type(model).__name__}")
    masks = []
    for module in model.modules():
        if isinstance(module, GatedBlock):
            if module.last_mask is None:
                raise RuntimeError("a GatedBlock has made no decision yet: run the model forward first")
            mask = module.last_mask
            if module.has_class_token and not include_class_token:
                mask = mask[:, 1:]
            masks.append(mask)
    return masks


@dataclass
class GateStatistics:
    """keep_ratio (L,): tokens kept per gated layer over the batch; keep_ratio_per_image
    (L, B); token_usage (B, N): in how many gated layers each token was processed (the
    paper's usage heat map); reactivation (L,): of the tokens layer l pruned, the fraction
    a later layer processes again (NaN where layer l pruned nothing)."""

    keep_ratio: torch.Tensor
    keep_ratio_per_image: torch.Tensor
    token_usage: torch.Tensor
    reactivation: torch.Tensor


def gate_statistics(source: Union[nn.Module, Sequence[torch.Tensor], torch.Tensor]) -> GateStatistics:
    """Statistics of the last forward of a model with GatedBlocks, or of given masks
    ((L, B, N) or a list of (B, N)), all layers having the same N."""
    if isinstance(source, nn.Module):
        masks = gate_masks(source)
    elif isinstance(source, torch.Tensor):
        masks = list(source.unbind(0)) if source.dim() == 3 else None
    else:
        masks = list(source)
    if not masks or any(not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape != masks[0].shape for m in masks):
        raise ValueError("gate_statistics needs masks from at least one gated layer, all of one shape (B, N)")
    kept = torch.stack([m.detach() for m in masks]) > 0  # (L, B, N)
    used_later = torch.zeros_like(kept)
    # used_later[l] = kept in some layer after l
    for layer in range(kept.shape[0] - 2, -1, -1):
        used_later[layer] = used_later[layer + 1] | kept[layer + 1]
    pruned = ~kept
    pruned_count = pruned.sum(dim=(1, 2))
    reactivated = (pruned & used_later).sum(dim=(1, 2))
    reactivation = torch.where(pruned_count > 0, reactivated / pruned_count.clamp_min(1), float("nan"))
    return GateStatistics(
        keep_ratio=kept.float().mean(dim=(1, 2)),
        keep_ratio_per_image=kept.float().mean(dim=2),
        token_usage=kept.sum(dim=0),
        reactivation=reactivation,
    )
