"""The training loop: one config, a progress bar, a checkpoint per epoch with resume,
JSON results, and multi-GPU training when started by torchrun (distributed.py).

Reproducibility: every epoch reseeds torch (and the shuffling) from (seed, epoch), so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..pruning import dynamic_keep_ratio_loss, gate_masks
from .atomic import write_text_atomically
from .build import build_model, load_dataset, prune_targets, resolve_device
from .checkpoints import CHECKPOINT, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import setup_distributed
from .evaluate import accuracy, flops_summary

__all__ = ["train", "RESULTS"]

RESULTS = "results.json"


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)


def _write_json(obj, path: Path) -> None:
    write_text_atomically(path, json.dumps(obj, indent=2) + "\n")


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Trains per `config`, writing out_dir/checkpoint.pt every epoch and out_dir/results.json
    at the end. With `resume`, continues from the checkpoint in out_dir when there is one."""
    device = resolve_device(config.device)
    dist_info, device = setup_distributed(device)
    out_dir = Path(config.out_dir)
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    data = load_dataset(config)
    model = build_model(config, data.num_classes, data.in_chans, initialise=True).to(device)
    # Weight decay on matrices only: not on biases, norms, the position code, or the score
    # kernel's θ (decay would pull the scorer towards the box filter).
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            decayed = parameter.dim() > 1 and "pos_embed" not in name and not name.endswith("attn.theta")
            (decay if decayed else no_decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    steps_per_epoch = math.ceil(len(data.train) / (config.batch_size * dist_info.world_size))
    total_steps = steps_per_epoch * config.epochs
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total_steps, warmup))

    targets = prune_targets(config, len(model.blocks)) if config.pruning == "svit" else None
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
                    gate_masks(model), targets
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
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
