"""Training and evaluation of the ViT models on the embedded datasets: one config, a
progress bar, a checkpoint per epoch with resume, JSON results, and multi-GPU training
when started by torchrun (DistributedDataParallel).

Reproducibility: every epoch reseeds torch (and the shuffling) from (seed, epoch), so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pickle
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import _validation as check
from ._atomic import write_atomically, write_text_atomically
from . import data as datasets
from .models import ATTENTIONS, ViTConfig, VisionTransformer, count_flops
from .nn import SCORINGS
from .pruning import (
    SimilarityPatchPruning,
    SimilarityPrunedBlocks,
    dynamic_keep_ratio_loss,
    gate_blocks,
    gate_masks,
)
from .reference import keep_count

__all__ = ["TrainConfig", "MODEL_SIZES", "build_model", "train", "evaluate", "load_checkpoint"]

# (embed_dim, depth, num_heads). "micro" trains in seconds on a CPU; the rest are ViT/DeiT's.
MODEL_SIZES = {
    "micro": (64, 4, 4),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}

# Token reduction applied on top of the attention: none, training-free similarity patch
# pruning, or SViT selective gating (bspf_ext.pruning).
PRUNINGS = ("none", "similarity", "svit")

CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"


@dataclass
class TrainConfig:
    """Everything a run depends on. Saved in every checkpoint and results file."""

    dataset: str = "digit-pairs"
    image_size: int = 32
    patch_size: int = 4
    train_size: int = 6000  # digit-pairs only: how many pairs to compose
    test_size: int = 1500
    model: str = "micro"
    attention: str = "bspf"
    attention_layers: Optional[list] = None
    block_size: int = 16
    keep_ratio: float = 0.5
    fuse: bool = True
    scoring: str = "learned"
    pruning: str = "none"
    prune_keep_ratio: float = 0.5
    # similarity: the blocks before which patches are pruned (default [0]: once, up front);
    # svit: the gated blocks (default: all but the first).
    prune_layers: Optional[list] = None
    prune_loss_weight: float = 2.0  # svit: weight of the dynamic keep-ratio loss
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs/default"
    label: str = ""

    def __post_init__(self) -> None:
        # Every field, so a config file with a wrong type fails here, naming the field,
        # rather than somewhere inside training. Floats are stored as floats (JSON may give 1).
        check.check_choice("dataset", self.dataset, sorted(datasets.DATASETS))
        for name in ("image_size", "patch_size", "train_size", "test_size", "epochs", "batch_size"):
            check.check_int(name, getattr(self, name), low=1)
        check.check_choice("model", self.model, sorted(MODEL_SIZES))
        check.check_choice("attention", self.attention, ATTENTIONS)
        check.check_block_size(self.block_size)
        self.keep_ratio = check.check_keep_ratio(self.keep_ratio)
        check.check_bool("fuse", self.fuse)
        check.check_choice("scoring", self.scoring, SCORINGS)
        check.check_choice("pruning", self.pruning, PRUNINGS)
        self.prune_keep_ratio = check.check_keep_ratio(self.prune_keep_ratio, "prune_keep_ratio")
        for name in ("attention_layers", "prune_layers"):
            _check_layer_list(name, getattr(self, name))
        self.prune_loss_weight = check.check_float("prune_loss_weight", self.prune_loss_weight, low=0)
        self.lr = check.check_float("lr", self.lr, low=0, low_open=True)
        self.weight_decay = check.check_float("weight_decay", self.weight_decay, low=0)
        self.warmup_epochs = check.check_float("warmup_epochs", self.warmup_epochs, low=0)
        check.check_int("seed", self.seed, low=0)
        for name in ("device", "out_dir", "label"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {check._describe(getattr(self, name))}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got {self.device!r}") from None

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        if not isinstance(values, dict):
            raise TypeError(f"a config must be a JSON object of TrainConfig fields, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def name(self) -> str:
        return self.label or self.attention


def _check_layer_list(name: str, layers) -> None:
    """None or a list of block indices (range-checked against the model when it is built)."""
    if layers is None:
        return
    if not isinstance(layers, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise TypeError(f"{name} must be null or a list of block indices (ints), got {layers!r}")


# ------------------------------------------------------------------------------ pieces


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


def _prune_layers(config: TrainConfig, depth: int) -> list:
    if config.prune_layers is not None:
        return list(config.prune_layers)
    return [0] if config.pruning == "similarity" else list(range(1, depth))


def apply_pruning(model: VisionTransformer, config: TrainConfig) -> VisionTransformer:
    """Puts the config's token reduction into the model's block stack, in place. Weights are
    untouched, so a trained dense model can be pruned without training (similarity)."""
    if config.pruning == "none":
        return model
    layers = _prune_layers(config, len(model.blocks))
    if config.pruning == "similarity":
        if 0 in layers:  # before the first block: scored on the bare patch projection
            model.patch_pruning = SimilarityPatchPruning(config.prune_keep_ratio, has_class_token=True)
        later = {i: config.prune_keep_ratio for i in layers if i != 0}
        if later:
            model.blocks = SimilarityPrunedBlocks(list(model.blocks), later, has_class_token=True)
    else:
        model.blocks = nn.Sequential(*gate_blocks(model.blocks, model.config.embed_dim, layers))
    return model


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class _Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: torch.device) -> tuple[_Distributed, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process per GPU (or CPU process with gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Distributed(), device
    import torch.distributed as dist

    dist_info = _Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist_info, device


# Test hook (tests/test_checkpoint_kill.py): BSPF_TEST_STALL_CHECKPOINT="<epoch>:<marker file>"
# makes the write of that epoch's checkpoint stop half-way: half of its bytes reach the
# temporary file (flushed to disk), the marker file is created, and the process sleeps
# until it is killed. So "killed while writing a checkpoint" is a moment a test can reach
# deterministically instead of by racing the writer.
STALL_CHECKPOINT_ENV = "BSPF_TEST_STALL_CHECKPOINT"


def _stall_marker(epoch: int) -> Optional[Path]:
    request = os.environ.get(STALL_CHECKPOINT_ENV, "")
    stall_epoch, _, marker = request.partition(":")
    return Path(marker) if marker and stall_epoch == str(epoch) else None


def _stall_half_written(state: dict, file, marker: Path) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    file.write(data[: len(data) // 2])
    file.flush()
    os.fsync(file.fileno())
    marker.write_text(f"{os.getpid()}\n")
    while True:  # until killed
        time.sleep(60)


def save_checkpoint(state: dict, path: Path) -> None:
    """Writes a training checkpoint atomically (bspf_ext._atomic): a kill at any moment
    leaves the previous checkpoint intact."""

    def write(file) -> None:
        marker = _stall_marker(state["epoch"])
        if marker is not None:
            _stall_half_written(state, file, marker)
        torch.save(state, file)

    write_atomically(path, write)


def _write_json(obj, path: Path) -> None:
    write_text_atomically(path, json.dumps(obj, indent=2) + "\n")


CHECKPOINT_KEYS = ("config", "epoch", "history", "model", "optimizer", "scheduler")


def load_checkpoint(path) -> dict:
    """A checkpoint written by train (a file, or the run's out_dir holding checkpoint.pt).
    FileNotFoundError when there is none; ValueError when the file is not a whole checkpoint
    (truncated, corrupt, or something else saved with torch.save)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupt?): {error}") from error
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"checkpoint {path} is not a bspf-ext training checkpoint: it lacks {missing}")
    return state


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)


# ------------------------------------------------------------------------- evaluation


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
    if pruning == "similarity":
        layers, patches, tokens = set(_prune_layers(config, vit.depth)), vit.num_tokens - 1, []
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


# --------------------------------------------------------------------------- training


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Trains per `config`, writing out_dir/checkpoint.pt every epoch and out_dir/results.json
    at the end. With `resume`, continues from the checkpoint in out_dir when there is one."""
    device = resolve_device(config.device)
    dist_info, device = _setup_distributed(device)
    out_dir = Path(config.out_dir)
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    data = load_dataset(config)
    model = build_model(config, data.num_classes, data.in_chans).to(device)
    decay, no_decay = [], []  # weight decay on matrices only, not on biases, norms or the position code
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() > 1 and "pos_embed" not in name else no_decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    steps_per_epoch = math.ceil(len(data.train) / (config.batch_size * dist_info.world_size))
    total_steps = steps_per_epoch * config.epochs
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total_steps, warmup))

    start_epoch, history = 0, []
    checkpoint_path = out_dir / CHECKPOINT
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        saved = TrainConfig.from_dict(state["config"])
        if saved.replace(epochs=config.epochs, out_dir=config.out_dir, device=config.device) != config:
            raise ValueError(f"the checkpoint in {out_dir} was made with a different config: {saved}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], state["history"]
        if dist_info.is_main:
            log(f"resuming {config.name} from epoch {start_epoch} ({checkpoint_path})")

    trained = model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    for epoch in range(start_epoch, config.epochs):
        torch.manual_seed(config.seed * 100_003 + epoch)
        if dist_info.enabled:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(data.train, dist_info.world_size, dist_info.rank, seed=config.seed)
            sampler.set_epoch(epoch)
            loader = DataLoader(data.train, batch_size=config.batch_size, sampler=sampler)
        else:
            shuffle = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
            loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True, generator=shuffle)

        trained.train()
        started, loss_sum, correct, count = time.perf_counter(), 0.0, 0, 0
        bar = _progress(loader, progress and dist_info.is_main, desc=f"{config.name} epoch {epoch + 1}/{config.epochs}")
        for images, labels in bar:
            images, labels = images.to(device), labels.to(device)
            logits = trained(images)
            loss = F.cross_entropy(logits, labels)
            if config.pruning == "svit":
                loss = loss + config.prune_loss_weight * dynamic_keep_ratio_loss(
                    gate_masks(model), config.prune_keep_ratio
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(-1) == labels).sum().item()
            count += len(labels)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}")
        seconds = time.perf_counter() - started

        if dist_info.is_main:
            test = accuracy(model, data.test, device)
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": loss_sum / count,
                    "train_accuracy": correct / count,
                    "test_loss": test["loss"],
                    "test_accuracy": test["accuracy"],
                    "seconds": seconds,
                }
            )
            save_checkpoint(
                {
                    "config": config.to_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                },
                checkpoint_path,
            )
            log(
                f"{config.name} epoch {epoch + 1}/{config.epochs}: train loss {loss_sum / count:.4f}, "
                f"test accuracy {test['accuracy']:.4f} ({seconds:.1f} s)"
            )
        if dist_info.enabled:
            import torch.distributed as dist

            dist.barrier()

    result = {}
    if dist_info.is_main:
        final = accuracy(model, data.test, device)
        result = {
            "name": config.name,
            "dataset": config.dataset,
            "device": str(device),
            "world_size": dist_info.world_size,
            "epochs": config.epochs,
            "test_accuracy": final["accuracy"],
            "test_loss": final["loss"],
            "images_per_second": final["images_per_second"],
            "train_seconds": sum(h["seconds"] for h in history),
            "history": history,
            "config": config.to_dict(),
        }
        result.update(flops_summary(model, config, data.test, device))
        _write_json(result, out_dir / RESULTS)
    return result
