"""Swapping the attention of an existing model for BSPF, in place.

`bspf_ext.swap.timm(model)` replaces every timm `Attention` (the ViT/DeiT attention) of a
timm model with a `BlockSymmetricAttention` carrying its weights (W_qk made per `qk_init`,
see `bspf_ext.models.convert`). timm is only needed for that entry point;
`swap_attention` does the same for any dense attention class with timm's layout.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from ._checks import check_choice
from .models.convert import QK_INITS, attention_from_dense
from .nn import SCORINGS
from .ops.validation import check_block_size, check_fuse, check_keep_ratio

__all__ = ["timm", "swap_attention"]

# The BlockSymmetricAttention options a swap may set; the rest come from the dense module.
_CHECKS = {
    "block_size": check_block_size,
    "keep_ratio": check_keep_ratio,
    "fuse": check_fuse,
    "scoring": lambda value: check_choice("scoring", value, SCORINGS),
}


def _check_arguments(model, layers, qk_init, bspf_kwargs) -> Optional[list]:
    """Every argument checked before any module is touched (and before timm is imported).
    Returns `layers` as a list (None stays None)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if layers is not None:
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"layers must be None or a sequence of attention-module indices, got {layers!r}")
        layers = list(layers)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise TypeError(f"layers must be a sequence of int indices, got {layers!r}")
    check_choice("qk_init", qk_init, QK_INITS)
    unknown = sorted(set(bspf_kwargs) - set(_CHECKS))
    if unknown:
        raise TypeError(f"unknown BlockSymmetricAttention options {unknown}; the options are {sorted(_CHECKS)}")
    for name, value in bspf_kwargs.items():
        _CHECKS[name](value)
    return layers


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
    layers = _check_arguments(model, layers, qk_init, bspf_kwargs)
    if not isinstance(attention_types, tuple) or not all(isinstance(t, type) for t in attention_types):
        raise TypeError(f"attention_types must be a tuple of classes, got {attention_types!r}")
    found = [(name, m) for name, m in model.named_modules() if type(m) in attention_types]
    if layers is None:
        chosen = range(len(found))
    else:
        for i in layers:
            if not -len(found) <= i < len(found):
                raise ValueError(f"layers must index the model's {len(found)} attention modules, got {layers}")
        chosen = sorted({i % len(found) for i in layers})
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
    layers = _check_arguments(model, layers, qk_init, bspf_kwargs)
    try:
        from timm.models.vision_transformer import Attention
    except ImportError as error:
        raise ImportError("bspf_ext.swap.timm needs timm (pip install timm)") from error
    replaced = swap_attention(model, (Attention,), layers=layers, qk_init=qk_init, **bspf_kwargs)
    if not replaced:
        raise ValueError(f"{type(model).__name__} has no timm ViT Attention module to replace")
    return model
