"""What a TrainConfig builds: the device, the dataset, and the model with its token
reduction."""

from __future__ import annotations

import torch
from torch import nn

from ..models import ViTConfig, VisionTransformer
from ..pruning import RandomPatchPruning, SimilarityPatchPruning, SimilarityPrunedBlocks, gate_blocks
from . import data as datasets
from .config import MODEL_SIZES, TrainConfig

__all__ = ["resolve_device", "load_dataset", "model_config", "build_model", "apply_pruning", "prune_layers",
           "prune_targets", "init_from_dense"]


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


def build_model(config: TrainConfig, num_classes: int, in_chans: int, *, initialise: bool = False) -> VisionTransformer:
    """The config's model, initialised from its seed; with `initialise` and `init_from` set,
    the dense run's weights converted to the config's attention (init_from_dense), as train
    starts. Pruning on top. (Without `initialise` the caller loads the weights it has.)"""
    torch.manual_seed(config.seed)
    model = VisionTransformer(model_config(config, num_classes, in_chans))
    if initialise and config.init_from:
        init_from_dense(model, config)
    return apply_pruning(model, config)


def init_from_dense(model: VisionTransformer, config: TrainConfig) -> VisionTransformer:
    """Loads the dense checkpoint config.init_from into the bare `model` (no pruning yet), in
    place: dense layers as they are, BSPF layers with W_qk from W_q, W_k by config.qk_init
    (bspf_ext.models.convert; θ stays the model's own). The source must be a dense run of the
    same model, image and patch size, without SViT gates (their keys would not fit)."""
    from ..models import load_timm_state_dict
    from .checkpoints import load_checkpoint

    state = load_checkpoint(config.init_from)
    source = TrainConfig.from_dict(state["config"])
    if source.attention != "dense":
        raise ValueError(f"init_from must be a dense run (bspf-ext train --attention dense); "
                         f"{config.init_from} has attention {source.attention!r}")
    for name in ("dataset", "model", "image_size", "patch_size"):
        if getattr(source, name) != getattr(config, name):
            raise ValueError(f"init_from {config.init_from} was trained with {name}={getattr(source, name)!r}, "
                             f"this config has {name}={getattr(config, name)!r}")
    if source.pruning == "svit":
        raise ValueError(f"init_from {config.init_from} has SViT gates; fine-tune from a run without them")
    load_timm_state_dict(model, state["model"], qk_init=config.qk_init)
    return model


def prune_layers(config: TrainConfig, depth: int) -> list:
    if config.prune_layers is not None:
        return list(config.prune_layers)
    return [0] if config.pruning in ("similarity", "random") else list(range(1, depth))


def prune_targets(config: TrainConfig, depth: int) -> list:
    """The keep-ratio target of each gated block (svit)."""
    layers = prune_layers(config, depth)
    if config.prune_targets is None:
        return [config.prune_keep_ratio] * len(layers)
    if len(config.prune_targets) != len(layers):
        raise ValueError(f"prune_targets must give one keep ratio per gated block ({len(layers)}: {layers}), "
                         f"got {len(config.prune_targets)}")
    return list(config.prune_targets)


def apply_pruning(model: VisionTransformer, config: TrainConfig) -> VisionTransformer:
    """Puts the config's token reduction into the model's block stack, in place. Weights are
    untouched, so a trained dense model can be pruned without training (similarity)."""
    if config.pruning == "none":
        return model
    layers = prune_layers(config, len(model.blocks))
    if config.pruning in ("similarity", "random"):
        depth = len(model.blocks)
        bad = [i for i in layers if not 0 <= i <= depth]
        if bad:
            raise ValueError(f"prune_layers must be block indices in [0, {depth}], got {bad}")

        def stage(i):
            if config.pruning == "similarity":
                return SimilarityPatchPruning(config.prune_keep_ratio, has_class_token=True)
            return RandomPatchPruning(config.prune_keep_ratio, seed=config.seed * 1_000 + i, has_class_token=True)

        if 0 in layers:  # before the first block (similarity: scored on the bare patch projection)
            model.patch_pruning = stage(0)
        later = {i: stage(i) for i in layers if i != 0}
        if later:
            model.blocks = SimilarityPrunedBlocks(list(model.blocks), later, has_class_token=True)
    else:
        prune_targets(config, len(model.blocks))  # one target per gated block
        model.blocks = nn.Sequential(*gate_blocks(model.blocks, model.config.embed_dim, layers))
    return model
