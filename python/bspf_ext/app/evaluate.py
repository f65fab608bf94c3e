"""Evaluation of a model: accuracy, loss, throughput, and FLOPs per image as the library's
counter gives them, with the token counts each block really runs on when it prunes."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..models import VisionTransformer, count_flops
from ..ops.geometry import keep_count
from .build import build_model, load_dataset, prune_layers, resolve_device
from .checkpoints import load_checkpoint
from .config import TrainConfig

__all__ = ["accuracy", "flops_summary", "evaluate"]


@torch.inference_mode()
def accuracy(model: nn.Module, dataset: TensorDataset, device: torch.device, batch_size: int = 256) -> dict:
    """Top-1 accuracy, mean loss and throughput (images per second, after a warm-up batch)."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    correct, loss_sum, count, timed_seconds = 0, 0.0, 0, 0.0
    for index, (images, labels) in enumerate(loader):
        images, labels = images.to(device), labels.to(device)
        if index == 0:
            model(images)  # warm-up: first-call allocations and lazy initialisation
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        logits = model(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timed_seconds += time.perf_counter() - start
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        count += len(labels)
    return {
        "accuracy": correct / max(count, 1),
        "loss": loss_sum / max(count, 1),
        "images_per_second": count / timed_seconds if timed_seconds > 0 else None,
    }


def _gate_flops(dim: int) -> int:
    """One SViT gate decision for one token: LayerNorm, C→C/4, GELU, C/4→2, compare."""
    hidden = max(dim // 4, 1)
    return 8 * dim + hidden * (2 * dim + 1) + hidden + 2 * (2 * hidden + 1) + 1


@torch.inference_mode()
def _gated_token_counts(model: VisionTransformer, dataset: TensorDataset, device, limit: int = 512) -> list:
    """Per image, how many tokens each block runs on at inference (SViT's argmax gates)."""
    model.eval()
    config, counts = model.config, []
    images = dataset.tensors[0][:limit]
    for start in range(0, len(images), 256):
        model(images[start : start + 256].to(device))
        kept = {}
        for index, block in enumerate(model.blocks):
            mask = getattr(block, "last_mask", None)
            if mask is not None:
                kept[index] = (mask > 0).sum(dim=1).cpu()
        for b in range(len(images[start : start + 256])):
            counts.append([int(kept[i][b]) if i in kept else config.num_tokens for i in range(config.depth)])
    return counts


def flops_summary(model: VisionTransformer, config: TrainConfig | None = None, dataset: TensorDataset | None = None,
                  device=None) -> dict:
    """Model and attention-core FLOPs per image, as bspf_ext.models.count_flops counts them,
    with the token counts each block really runs on when the model prunes tokens (SViT:
    measured per image on `dataset` and averaged, plus the gates' own cost)."""
    vit = model.config
    pruning = "none" if config is None else config.pruning
    if pruning in ("similarity", "random"):  # the same token counts
        layers, patches, tokens = set(prune_layers(config, vit.depth)), vit.num_tokens - 1, []
        for i in range(vit.depth):
            if i in layers:
                patches = keep_count(config.prune_keep_ratio, 1, patches)
            tokens.append(patches + 1)
        per_image = [tokens]
    elif pruning == "svit":
        per_image = _gated_token_counts(model, dataset, device)
    else:
        per_image = [None]
    totals = {"model_flops": 0.0, "attention_flops": 0.0}
    for tokens in per_image:
        counted = count_flops(vit, batch_size=1, tokens=tokens)
        totals["model_flops"] += counted.total
        totals["attention_flops"] += sum(layer.parts.get("attention core", 0) for layer in counted.layers)
    result = {key: value / len(per_image) for key, value in totals.items()}
    if pruning == "svit":
        gated = sum(1 for block in model.blocks if hasattr(block, "gate"))
        gate_cost = _gate_flops(vit.embed_dim) * vit.num_tokens * gated
        result["model_flops"] += gate_cost
        result["mean_tokens_per_block"] = [sum(t[i] for t in per_image) / len(per_image) for i in range(vit.depth)]
    return {key: (round(value) if isinstance(value, float) else value) for key, value in result.items()}


def evaluate(checkpoint, *, device: str = "auto", dataset_split: str = "test") -> dict:
    """Accuracy, loss, throughput and FLOPs of a saved model on its dataset's split."""
    state = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict(state["config"])
    torch_device = resolve_device(device)
    data = load_dataset(config)
    model = build_model(config, data.num_classes, data.in_chans)
    model.load_state_dict(state["model"])
    model.to(torch_device)
    split = data.test if dataset_split == "test" else data.train
    result = {"name": config.name, "epoch": state["epoch"], "split": dataset_split, "device": str(torch_device)}
    result.update(accuracy(model, split, torch_device))
    result.update(flops_summary(model, config, split, torch_device))
    result["config"] = config.to_dict()
    return result
