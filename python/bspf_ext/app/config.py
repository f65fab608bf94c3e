"""TrainConfig: everything a training run depends on, checked field by field, saved in
every checkpoint and results file."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import _checks as check
from ..models import ATTENTIONS, QK_INITS
from ..models.vit import SIZES
from ..nn import SCORINGS
from ..ops.validation import check_block_size, check_keep_ratio
from . import data as datasets

__all__ = ["TrainConfig", "MODEL_SIZES", "PRUNINGS"]

# (embed_dim, depth, num_heads): "micro" trains in seconds on a CPU; the rest are ViT/DeiT's.
MODEL_SIZES = {"micro": (64, 4, 4), **SIZES}

# Token reduction applied on top of the attention: none, training-free similarity patch
# pruning, its baseline random patch pruning (seeded by `seed`), or SViT selective gating
# (bspf_ext.pruning).
PRUNINGS = ("none", "similarity", "random", "svit")


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
    # similarity / random: the blocks before which patches are pruned (default [0]: once, up
    # front); svit: the gated blocks (default: all but the first; SViT's paper gates blocks
    # 4-12 of 12, i.e. 3 … depth-1).
    prune_layers: Optional[list] = None
    prune_loss_weight: float = 2.0  # svit: λ, the weight of the dynamic keep-ratio loss (the paper's 4)
    # svit: the keep-ratio target of each gated block (default: prune_keep_ratio for all; the
    # paper's [0.7]*3 + [0.49]*3 + [0.343]*3 is bspf_ext.pruning.svit_keep_targets()).
    prune_targets: Optional[list] = None
    # Fine-tuning: a dense run's out_dir (or checkpoint) whose weights start this run, converted
    # to this config's attention by qk_init (bspf_ext.models.convert); "" = from scratch.
    init_from: str = ""
    qk_init: str = "spectral"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    clip_grad_norm: float = 0.0  # the largest gradient norm per step; 0 = no clipping
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
        check_block_size(self.block_size)
        self.keep_ratio = check_keep_ratio(self.keep_ratio)
        check.check_bool("fuse", self.fuse)
        check.check_choice("scoring", self.scoring, SCORINGS)
        check.check_choice("pruning", self.pruning, PRUNINGS)
        self.prune_keep_ratio = check_keep_ratio(self.prune_keep_ratio, "prune_keep_ratio")
        for name in ("attention_layers", "prune_layers"):
            _check_layer_list(name, getattr(self, name))
        self.prune_targets = _check_targets(self.prune_targets, self.prune_layers)
        check.check_choice("qk_init", self.qk_init, QK_INITS)
        self.prune_loss_weight = check.check_float("prune_loss_weight", self.prune_loss_weight, low=0)
        self.lr = check.check_float("lr", self.lr, low=0, low_open=True)
        self.weight_decay = check.check_float("weight_decay", self.weight_decay, low=0)
        self.warmup_epochs = check.check_float("warmup_epochs", self.warmup_epochs, low=0)
        self.clip_grad_norm = check.check_float("clip_grad_norm", self.clip_grad_norm, low=0)
        check.check_int("seed", self.seed, low=0)
        for name in ("device", "out_dir", "label", "init_from"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {check.describe(getattr(self, name))}")
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


def _check_targets(targets, layers):
    """None or a list of keep ratios in [0, 1], one per gated block when prune_layers is given
    (otherwise checked against the model's gated blocks when it is built)."""
    if targets is None:
        return None
    if not isinstance(targets, (list, tuple)) or not targets:
        raise TypeError(f"prune_targets must be null or a non-empty list of keep ratios, got {targets!r}")
    targets = [check_keep_ratio(t, "prune_targets") for t in targets]
    if layers is not None and len(targets) != len(layers):
        raise ValueError(f"prune_targets must give one keep ratio per block of prune_layers ({len(layers)}), "
                         f"got {len(targets)}")
    return targets
