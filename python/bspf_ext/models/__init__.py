"""ViT/DeiT models with dense, chunk or BSPF attention, their FLOPs, and conversion from
dense (timm-format) checkpoints."""

from .approximation import approximation_errors, format_approximation_table
from .convert import QK_INITS, attention_from_dense, convert_state_dict, load_timm_state_dict
from .flops import AttentionFlops, ModelFlops, count_flops, format_flops_table
from .vit import (
    ATTENTIONS,
    ViTConfig,
    VisionTransformer,
    deit_base,
    deit_small,
    deit_tiny,
    vit_base,
    vit_small,
    vit_tiny,
)

__all__ = [
    "ATTENTIONS",
    "QK_INITS",
    "ViTConfig",
    "VisionTransformer",
    "vit_tiny",
    "vit_small",
    "vit_base",
    "deit_tiny",
    "deit_small",
    "deit_base",
    "attention_from_dense",
    "convert_state_dict",
    "load_timm_state_dict",
    "approximation_errors",
    "format_approximation_table",
    "AttentionFlops",
    "ModelFlops",
    "count_flops",
    "format_flops_table",
]
