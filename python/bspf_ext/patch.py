"""Swapping the attention of an existing model for BSPF, in place.

`bspf_ext.patch.timm(model)` replaces every timm `Attention` (the ViT/DeiT attention) of a
timm model with a `BlockSymmetricAttention` carrying its weights (W_qk made per `qk_init`,
see `bspf_ext.models.convert`). timm is only needed for that entry point;
`swap_attention` does the same for any dense attention class with timm's layout.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from .models.convert import attention_from_dense

__all__ = ["timm", "swap_attention"]


def swap_attention(
    model: nn.Module,
    attention_types: tuple,
    *,
    layers: Optional[Sequence[int]] = None,
    qk_init: str = "spectral",
    **bspf_kwargs,
) -> list:
    """Replaces, in place, the modules of exactly these types (subclasses are left alone: they
    may compute something else) with BSPF layers. `layers` picks among them by their order
    in `model.named_modules()` (for a ViT, the block index; None: all). Returns the names of
    the replaced modules."""
    found = [(name, m) for name, m in model.named_modules() if type(m) in attention_types]
    if layers is None:
        chosen = range(len(found))
    else:
        chosen = sorted({int(i) % len(found) for i in layers}) if found else []
        for i in layers:
            if not -len(found) <= i < len(found):
                raise ValueError(f"layers must index the model's {len(found)} attention modules, got {list(layers)}")
    replaced = []
    for index in chosen:
        name, module = found[index]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, attention_from_dense(module, qk_init=qk_init, **bspf_kwargs))
        replaced.append(name)
    return replaced


def timm(model: nn.Module, *, layers: Optional[Sequence[int]] = None, qk_init: str = "spectral", **bspf_kwargs) -> nn.Module:
    """Swaps the ViT/DeiT attention modules of a timm model for BlockSymmetricAttention in
    place and returns the model. `bspf_kwargs`: block_size, keep_ratio, fuse, scoring.

    Raises ImportError without timm, ValueError when the model has no timm ViT attention."""
    try:
        from timm.models.vision_transformer import Attention
    except ImportError as error:
        raise ImportError("bspf_ext.patch.timm needs timm (pip install timm)") from error
    replaced = swap_attention(model, (Attention,), layers=layers, qk_init=qk_init, **bspf_kwargs)
    if not replaced:
        raise ValueError(f"{type(model).__name__} has no timm ViT Attention module to replace")
    return model
