"""What a TrainConfig builds: the device, the dataset, and the model with its token
reduction."""

from __future__ import annotations

import torch
from torch import nn

from ..models import ViTConfig, VisionTransformer
from ..pruning import SimilarityPatchPruning, SimilarityPrunedBlocks, gate_blocks
from . import data as datasets
from .config import MODEL_SIZES, TrainConfig

__all__ = ["resolve_device", "load_dataset", "model_config", "build_model", "apply_pruning", "prune_layers"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but torch sees no CUDA device")
    return device


def load_dataset(config: TrainConfig) -> datasets.EmbeddedDataset:
    kwargs = dict(image_size=config.image_size, seed=config.seed)
    if config.dataset == "digit-pairs":
        kwargs.update(train_size=config.train_size, test_size=config.test_size)
    return datasets.load(config.dataset, **kwargs)


def model_config(config: TrainConfig, num_classes: int, in_chans: int) -> ViTConfig:
    embed_dim, depth, num_heads = MODEL_SIZES[config.model]
    layers = None if config.attention_layers is None else tuple(config.attention_layers)
    return ViTConfig(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        attention=config.attention,
        attention_layers=layers,
        block_size=config.block_size,
        keep_ratio=config.keep_ratio,
        fuse=config.fuse,
        scoring=config.scoring,
    )


def build_model(config: TrainConfig, num_classes: int, in_chans: int) -> VisionTransformer:
    torch.manual_seed(config.seed)
    return apply_pruning(VisionTransformer(model_config(config, num_classes, in_chans)), config)


def prune_layers(config: TrainConfig, depth: int) -> list:
    if config.prune_layers is not None:
        return list(config.prune_layers)
    return [0] if config.pruning == "similarity" else list(range(1, depth))


def apply_pruning(model: VisionTransformer, config: TrainConfig) -> VisionTransformer:
    """Puts the config's token reduction into the model's block stack, in place. Weights are
    untouched, so a trained dense model can be pruned without training (similarity)."""
    if config.pruning == "none":
        return model
    layers = prune_layers(config, len(model.blocks))
    if config.pruning == "similarity":
        if 0 in layers:  # before the first block: scored on the bare patch projection
            model.patch_pruning = SimilarityPatchPruning(config.prune_keep_ratio, has_class_token=True)
        later = {i: config.prune_keep_ratio for i in layers if i != 0}
        if later:
            model.blocks = SimilarityPrunedBlocks(list(model.blocks), later, has_class_token=True)
    else:
        model.blocks = nn.Sequential(*gate_blocks(model.blocks, model.config.embed_dim, layers))
    return model
