"""ViT / DeiT with a choice of attention per block: "dense", "chunk" or "bspf".

The module tree and parameter names follow timm's `VisionTransformer` (class token,
`token` pooling, no distillation token), so a timm ViT/DeiT state_dict loads into the
dense model with `load_state_dict` unchanged, and into a BSPF model through
`bspf_ext.models.load_timm_state_dict`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_choice, check_float, check_int
from ..ops.validation import check_block_size, check_keep_ratio
from ..nn import SCORINGS, BlockSymmetricAttention, ChunkAttention, DenseAttention

__all__ = [
    "ATTENTIONS",
    "ViTConfig",
    "VisionTransformer",
    "vit_tiny",
    "vit_small",
    "vit_base",
    "deit_tiny",
    "deit_small",
    "deit_base",
]

ATTENTIONS = ("dense", "chunk", "bspf")

# (embed_dim, depth, num_heads) of the standard sizes; DeiT uses the same architectures.
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}


@dataclass(frozen=True)
class ViTConfig:
    """Everything that decides a model's architecture.

    `attention` is used in the blocks listed in `attention_layers` (None: every block);
    the other blocks use dense attention. `block_size`, `keep_ratio`, `fuse` and `scoring`
    configure the BSPF layers (`block_size` the chunk layers too).
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention: str = "dense"
    attention_layers: Optional[tuple] = None
    block_size: int = 16
    keep_ratio: float = 0.5
    fuse: bool = True
    scoring: str = "learned"

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            check_int(name, getattr(self, name), low=1)
        check_int("num_classes", self.num_classes, low=0)  # 0: no head
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        check_float("mlp_ratio", self.mlp_ratio, low=0, low_open=True)
        check_bool("qkv_bias", self.qkv_bias)
        check_float("drop_rate", self.drop_rate, low=0, high=1)
        check_float("drop_path_rate", self.drop_path_rate, low=0, high=1)
        check_choice("attention", self.attention, ATTENTIONS)
        check_choice("scoring", self.scoring, SCORINGS)
        check_block_size(self.block_size)
        check_keep_ratio(self.keep_ratio)
        check_bool("fuse", self.fuse)
        if self.attention_layers is not None:
            if isinstance(self.attention_layers, (str, bytes)) or not hasattr(self.attention_layers, "__iter__"):
                raise TypeError(
                    f"attention_layers must be None or a sequence of block indices, got {self.attention_layers!r}"
                )
            layers = tuple(self.attention_layers)
            for i in layers:
                if isinstance(i, bool) or not isinstance(i, int) or not -self.depth <= i < self.depth:
                    raise ValueError(
                        f"attention_layers must hold block indices in [0, {self.depth}) "
                        f"(negative counts from the end), got {self.attention_layers!r}"
                    )
            object.__setattr__(self, "attention_layers", tuple(sorted({i % self.depth for i in layers})))

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Sequence length the attention sees: the patches plus the class token."""
        return self.grid_size**2 + 1

    def attention_of(self, layer: int) -> str:
        """The attention kind block `layer` uses."""
        if self.attention_layers is None or layer in self.attention_layers:
            return self.attention
        return "dense"

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)


def make_attention(config: ViTConfig, kind: str) -> nn.Module:
    dim, heads = config.embed_dim, config.num_heads
    if kind == "dense":
        return DenseAttention(dim, heads, qkv_bias=config.qkv_bias)
    if kind == "chunk":
        return ChunkAttention(dim, heads, block_size=config.block_size, qkv_bias=config.qkv_bias)
    return BlockSymmetricAttention(
        dim,
        heads,
        block_size=config.block_size,
        keep_ratio=config.keep_ratio,
        fuse=config.fuse,
        qkv_bias=config.qkv_bias,
        scoring=config.scoring,
    )


class PatchEmbed(nn.Module):
    """Image (B, 3, H, W) -> patch tokens (B, N, C) by a strided convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.proj.in_channels, self.img_size, self.img_size)
        if not isinstance(x, Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B, {', '.join(map(str, expected))}), "
                            f"got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got dtype {x.dtype}")
        return self.proj(x).flatten(2).transpose(1, 2)


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's whole residual branch with probability p in training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, config: ViTConfig, attention: str, drop_path: float) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = make_attention(config, attention)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), config.drop_rate)
        self.drop_path2 = DropPath(drop_path)
        self.attention = attention

    @property
    def supports_key_mask(self) -> bool:
        """Whether forward can hide tokens from attention (dense attention only: BSPF and
        chunk attention decide their own masks)."""
        return self.attention == "dense"

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        """x (B, N, C); key_mask (B, N) bool, False = no query may attend to that token."""
        if key_mask is None:
            attended = self.attn(self.norm1(x))
        elif not self.supports_key_mask:
            raise ValueError(f"key_mask needs dense attention; this block uses {self.attention!r}")
        else:
            attended = self.attn(self.norm1(x), attn_mask=key_mask[:, None, None, :])
        x = x + self.drop_path1(attended)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT/DeiT classifier (class token, pre-norm blocks, `token` pooling)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise TypeError(f"config must be a ViTConfig, got {type(config).__name__}")
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, dim))
        self.pos_drop = nn.Dropout(config.drop_rate)
        # On the CPU whatever the default device, so a model can be built under torch.device("meta").
        drop_paths = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()
        self.blocks = nn.Sequential(
            *(Block(config, config.attention_of(i), drop_paths[i]) for i in range(config.depth))
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes else nn.Identity()
        # Optional token pruning before the first block: a module called as
        # patch_pruning(tokens, score_tokens=...) -> fewer tokens, class token first
        # (bspf_ext.pruning.SimilarityPatchPruning). No parameters of its own are expected.
        self.patch_pruning: Optional[nn.Module] = None
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_features(self, images: Tensor) -> Tensor:
        patches = self.patch_embed(images)
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        x = self.pos_drop(tokens + self.pos_embed)
        if self.patch_pruning is not None:
            # Scored on the bare patch projection, as similarity pruning prescribes: the
            # position embedding would make every patch look different from the others.
            x = self.patch_pruning(x, score_tokens=tokens)
        return self.norm(self.blocks(x))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.forward_features(images)[:, 0])


def _build(size: str, attention: str, attention_layers: Optional[Sequence[int]], **overrides) -> VisionTransformer:
    embed_dim, depth, num_heads = SIZES[size]
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"vit_{size}: unknown options {unknown}; the options are ViTConfig's fields {sorted(known)}")
    fields = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    fields.update(overrides)  # e.g. depth=2 for a small test model
    config = ViTConfig(attention=attention, attention_layers=attention_layers, **fields)
    return VisionTransformer(config)


def vit_tiny(attention: str = "dense", attention_layers: Optional[Sequence[int]] = None, **config) -> VisionTransformer:
    """ViT-Ti (192 wide, 12 blocks, 3 heads). `config` sets any other ViTConfig field,
    e.g. img_size=32, patch_size=8, keep_ratio=0.3, block_size=16, num_classes=10."""
    return _build("tiny", attention, attention_layers, **config)


def vit_small(attention: str = "dense", attention_layers: Optional[Sequence[int]] = None, **config) -> VisionTransformer:
    """ViT-S (384 wide, 12 blocks, 6 heads); other fields as in vit_tiny."""
    return _build("small", attention, attention_layers, **config)


def vit_base(attention: str = "dense", attention_layers: Optional[Sequence[int]] = None, **config) -> VisionTransformer:
    """ViT-B (768 wide, 12 blocks, 12 heads); other fields as in vit_tiny."""
    return _build("base", attention, attention_layers, **config)


# DeiT's architectures are ViT's (DeiT changed the training recipe, not the network).
deit_tiny = vit_tiny
deit_small = vit_small
deit_base = vit_base
