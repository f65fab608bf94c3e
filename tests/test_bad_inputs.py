"""Bad input at every public entry point raises ValueError or TypeError whose message names
the argument and says what was expected — never a crash, a raw torch error or a wrong answer.

One table: each row is (argument the message must name, the call, the exception type, a
fragment of what the message must say was expected).
"""

import math
import re

import pytest
import torch
from torch import nn

import bspf_ext
from bspf_ext import BlockSymmetricAttention, models, pruning, swap
from bspf_ext.app import data
from bspf_ext.nn import ChunkAttention, DenseAttention
from bspf_ext.app.config import TrainConfig

QK = torch.randn(1, 2, 10, 4)
V = torch.randn(1, 2, 10, 3)
TOKENS = torch.randn(2, 5, 16)  # (B, N, C), class token first
SMALL_VIT = dict(img_size=16, patch_size=8, depth=1, num_classes=3)


def op(qk=QK, v=V, **kwargs):
    return bspf_ext.block_symmetric_attention(qk, v, **kwargs)


def kernel(*values):
    """A 3×3 score kernel: the box filter with its first entries replaced by `values`."""
    k = torch.full((3, 3), 1.0 / 9.0)
    k.view(-1)[: len(values)] = torch.tensor(values)
    return k


def vit():
    return models.vit_tiny("bspf", **SMALL_VIT)


def dense_state():
    return models.vit_tiny("dense", **SMALL_VIT).state_dict()


def row(argument, call, error, expected):
    return pytest.param(argument, call, error, expected, id=f"{argument}: {expected}")


def numbered(rows):
    """The rows with their number in the id, so rows naming the same argument and
    expectation (one mistake at two entry points) stay apart."""
    return [pytest.param(*p.values, id=f"{i:03d} {p.id}") for i, p in enumerate(rows)]


BAD_INPUTS = [
    # ---- the operator: block_symmetric_attention and block_mask
    row("qk", lambda: op(qk=torch.randn(2, 10, 4)), ValueError, "shape (B, H, N, D)"),
    row("qk", lambda: op(qk=[[1.0]]), TypeError, "torch.Tensor"),
    row("qk", lambda: op(qk=torch.ones(1, 2, 10, 4, dtype=torch.int64)), TypeError, "floating-point"),
    row("qk", lambda: op(qk=torch.randn(1, 2, 10, 0)), ValueError, "head dimension"),
    row("qk", lambda: op(qk=QK.half(), v=V.half()), TypeError, "float32 or float64"),
    row("qk", lambda: op(qk=QK.to(torch.float8_e4m3fn), v=V.to(torch.float8_e4m3fn)), TypeError, "bfloat16"),
    row("v", lambda: op(v=torch.randn(2, 10, 3)), ValueError, "shape (B, H, N, D)"),
    row("v", lambda: op(v=torch.randn(1, 2, 11, 3)), ValueError, "(B, H, N) = (1, 2, 10)"),
    row("v", lambda: op(v=torch.randn(1, 3, 10, 3)), ValueError, "(B, H, N) = (1, 2, 10)"),
    row("v", lambda: op(v=torch.ones(1, 2, 10, 3, dtype=torch.int32)), TypeError, "floating-point"),
    row("v", lambda: op(v=V.double()), TypeError, "dtype of qk"),
    row("v", lambda: op(v=V.to("meta")), ValueError, "device of qk"),
    row("block_size", lambda: op(block_size=0), ValueError, "int in [1, 64]"),
    row("block_size", lambda: op(block_size=65), ValueError, "int in [1, 64]"),
    row("block_size", lambda: op(block_size=16.0), TypeError, "int in [1, 64]"),
    row("block_size", lambda: op(block_size=True), TypeError, "int in [1, 64]"),
    row("keep_ratio", lambda: op(keep_ratio=-0.1), ValueError, "float in [0, 1]"),
    row("keep_ratio", lambda: op(keep_ratio=1.5), ValueError, "float in [0, 1]"),
    row("keep_ratio", lambda: op(keep_ratio=math.nan), ValueError, "float in [0, 1]"),
    row("keep_ratio", lambda: op(keep_ratio="half"), TypeError, "float in [0, 1]"),
    row("scale", lambda: op(scale=math.inf), ValueError, "finite float or None"),
    row("scale", lambda: op(scale="1"), TypeError, "finite float or None"),
    row("fuse", lambda: op(fuse=1), TypeError, "bool"),
    row("score_kernel", lambda: op(score_kernel=torch.ones(2, 2)), ValueError, "shape (3, 3)"),
    row("score_kernel", lambda: op(score_kernel=torch.ones(3, 3, dtype=torch.float64)), TypeError, "dtype of qk"),
    row("score_kernel", lambda: op(score_kernel=[[1.0] * 3] * 3), TypeError, "(3, 3) torch.Tensor"),
    row("score_kernel", lambda: op(score_kernel=kernel(math.nan)), ValueError, "finite weights >= 0"),
    row("score_kernel", lambda: op(score_kernel=kernel(math.inf)), ValueError, "finite weights >= 0"),
    row("score_kernel", lambda: op(score_kernel=kernel(-0.5, 0.3)), ValueError, "finite weights >= 0"),
    row("score_kernel", lambda: bspf_ext.block_mask(QK, kernel(math.nan)), ValueError, "finite weights >= 0"),
    row("qk", lambda: bspf_ext.block_mask(torch.randn(4, 2)), ValueError, "shape (B, H, N, D)"),
    row("block_size", lambda: bspf_ext.block_mask(QK, block_size=100), ValueError, "int in [1, 64]"),
    # ---- the layers
    row("x", lambda: BlockSymmetricAttention(64, num_heads=4)(torch.randn(2, 10, 32)), ValueError, "(B, N, 64)"),
    row("x", lambda: BlockSymmetricAttention(64, num_heads=4)(torch.randn(10, 64)), ValueError, "(B, N, 64)"),
    row("x", lambda: BlockSymmetricAttention(64, num_heads=4)("tokens"), TypeError, "torch.Tensor"),
    row("x", lambda: BlockSymmetricAttention(64, num_heads=4).keep_mask(torch.randn(2, 10)), ValueError, "(B, N, 64)"),
    row("x", lambda: DenseAttention(32, 4)(torch.randn(2, 7, 16)), ValueError, "(B, N, 32)"),
    row("x", lambda: ChunkAttention(32, 4)(torch.ones(2, 7, 32, dtype=torch.long)), TypeError, "floating-point"),
    row("dim", lambda: BlockSymmetricAttention("64"), TypeError, "int >= 1"),
    row("num_heads", lambda: BlockSymmetricAttention(64, num_heads=0), ValueError, "int >= 1"),
    row("num_heads", lambda: BlockSymmetricAttention(30, 4), ValueError, "divisible"),
    row("qkv_bias", lambda: BlockSymmetricAttention(64, 4, qkv_bias="yes"), TypeError, "bool"),
    row("proj_drop", lambda: BlockSymmetricAttention(64, 4, proj_drop=2.0), ValueError, "in [0, 1]"),
    row("attn_drop", lambda: BlockSymmetricAttention(64, 4, attn_drop=0.1), ValueError, "must be 0.0"),
    row("scoring", lambda: BlockSymmetricAttention(64, 4, scoring="median"), ValueError, "one of"),
    row("scoring", lambda: BlockSymmetricAttention(64, 4, scoring=None), TypeError, "one of"),
    row("norm_layer", lambda: BlockSymmetricAttention(64, 4, qk_norm=True, norm_layer="ln"), TypeError, "callable"),
    # ---- the model builders and the ViT
    row("keep_ratio", lambda: models.vit_tiny("bspf", keep_ratio=2.0, **SMALL_VIT), ValueError, "float in [0, 1]"),
    row("keep_ratio", lambda: models.vit_small("dense", keep_ratio=-1, **SMALL_VIT), ValueError, "float in [0, 1]"),
    row("attention", lambda: models.vit_base("sparse", **SMALL_VIT), ValueError, "one of"),
    row("attention_layers", lambda: models.deit_tiny("bspf", attention_layers=3, **SMALL_VIT), TypeError, "sequence"),
    row("attention_layers", lambda: models.vit_tiny("bspf", attention_layers=[5], **SMALL_VIT), ValueError, "[0, 1)"),
    row("img_size", lambda: models.vit_tiny(img_size=30, patch_size=8), ValueError, "multiple of patch_size"),
    row("mlp_ratio", lambda: models.vit_tiny(mlp_ratio=0, **SMALL_VIT), ValueError, "float > 0"),
    row("drop_path_rate", lambda: models.vit_tiny(drop_path_rate="0.1", **SMALL_VIT), TypeError, "in [0, 1]"),
    row("block_size", lambda: models.vit_tiny("chunk", block_size=128, **SMALL_VIT), ValueError, "int in [1, 64]"),
    row("fuse", lambda: models.vit_tiny("bspf", fuse="no", **SMALL_VIT), TypeError, "bool"),
    row("img_sise", lambda: models.vit_tiny(img_sise=16), TypeError, "unknown options"),
    row("config", lambda: models.VisionTransformer({"depth": 2}), TypeError, "ViTConfig"),
    row("images", lambda: vit()(torch.randn(2, 3, 32, 32)), ValueError, "(B, 3, 16, 16)"),
    row("images", lambda: vit()(torch.randn(2, 1, 16, 16)), ValueError, "(B, 3, 16, 16)"),
    row("images", lambda: vit()(None), TypeError, "torch.Tensor"),
    # ---- checkpoint conversion and patching
    row("model", lambda: models.load_timm_state_dict(nn.Linear(2, 2), dense_state()), TypeError, "VisionTransformer"),
    row("state_dict", lambda: models.load_timm_state_dict(vit(), [1, 2]), TypeError, "mapping"),
    row("state_dict", lambda: models.load_timm_state_dict(vit(), {"cls_token": 1.0}), TypeError, "tensors"),
    row("state_dict", lambda: models.load_timm_state_dict(vit(), {"cls_token": torch.zeros(1)}), ValueError,
        "blocks.0.attn.qkv.weight"),
    row("state_dict", lambda: models.load_timm_state_dict(vit(), {**dense_state(), "extra": torch.zeros(1)}),
        ValueError, "unexpected keys ['extra']"),
    row("qk_init", lambda: models.load_timm_state_dict(vit(), dense_state(), qk_init="average"), ValueError, "one of"),
    row("skip_head", lambda: models.load_timm_state_dict(vit(), dense_state(), skip_head="yes"), TypeError, "bool"),
    row("model", lambda: swap.timm("vit_base"), TypeError, "nn.Module"),
    row("layers", lambda: swap.timm(nn.Linear(2, 2), layers="0"), TypeError, "sequence"),
    row("qk_init", lambda: swap.timm(nn.Linear(2, 2), qk_init="svd"), ValueError, "one of"),
    row("keep_ratio", lambda: swap.timm(nn.Linear(2, 2), keep_ratio=3), ValueError, "float in [0, 1]"),
    row("blocksize", lambda: swap.timm(nn.Linear(2, 2), blocksize=8), TypeError, "unknown"),
    row("layers", lambda: swap.swap_attention(models.vit_tiny(**SMALL_VIT), (DenseAttention,), layers=[3]),
        ValueError, "index the model's 1 attention modules"),
    row("attention_types", lambda: swap.swap_attention(vit(), DenseAttention), TypeError, "tuple of classes"),
    # ---- pruning
    row("keep_ratio", lambda: pruning.similarity_prune(TOKENS, 1.5), ValueError, "float in [0, 1]"),
    row("tokens", lambda: pruning.similarity_prune(TOKENS[0], 0.5), ValueError, "(B, N, C)"),
    row("diversity", lambda: pruning.similarity_prune(TOKENS, 0.5, diversity=-1.0), ValueError, "float >= 0"),
    row("grid_size", lambda: pruning.similarity_prune(TOKENS, 0.5, diversity=1.0, grid_size=(3, 3)), ValueError,
        "cells"),
    row("threshold", lambda: pruning.SimilarityPatchPruning(threshold="0.5"), TypeError, "finite float"),
    row("keep_ratios", lambda: pruning.SimilarityPrunedBlocks([nn.Identity()], [0.5]), TypeError, "dict"),
    row("dim", lambda: pruning.SelectiveGate(0), ValueError, "int >= 1"),
    row("tau", lambda: pruning.SelectiveGate(16, tau=0.0), ValueError, "float > 0"),
    row("init_keep_logit", lambda: pruning.SelectiveGate(16, init_keep_logit="high"), TypeError, "finite float"),
    row("x", lambda: pruning.SelectiveGate(16)(torch.randn(2, 5, 17)), ValueError, "C = dim = 16"),
    row("block", lambda: pruning.GatedBlock("block", 16), TypeError, "nn.Module"),
    row("gate", lambda: pruning.GatedBlock(nn.Identity(), 16, gate=nn.Identity()), TypeError, "SelectiveGate"),
    row("gated", lambda: pruning.gate_blocks([nn.Identity()], 16, gated=[1]), ValueError, "block indices"),
    row("gated", lambda: pruning.gate_blocks([nn.Identity()], 16, gated=1), TypeError, "iterable"),
    row("mask", lambda: pruning.masked_block_update(nn.Identity(), TOKENS, torch.full((2, 5), 0.5),
                                                    pass_key_mask=False), ValueError, "only 0 and 1"),
    row("mask", lambda: pruning.gathered_block_update(nn.Identity(), TOKENS, torch.ones(2, 4),
                                                      pass_key_mask=False), ValueError, "(B, N) = (2, 5)"),
    row("keep_ratio", lambda: pruning.RandomPatchPruning(1.5), ValueError, "float in [0, 1]"),
    row("seed", lambda: pruning.RandomPatchPruning(0.5, seed=-1), ValueError, "int >= 0"),
    row("tokens", lambda: pruning.RandomPatchPruning(0.5)(torch.zeros(2, 5)), ValueError, "(B, N, C)"),
    row("keep_ratio", lambda: pruning.random_prune(TOKENS, "half"), TypeError, "float in [0, 1]"),
    row("masks", lambda: pruning.dynamic_keep_ratio_loss([], 0.5), ValueError, "empty"),
    row("masks", lambda: pruning.fixed_keep_ratio_loss(0.5, 0.5), TypeError, "list of (B, N) tensors"),
    row("targets", lambda: pruning.dynamic_keep_ratio_loss([torch.ones(2, 3)], None), TypeError, "keep ratio"),
    row("targets", lambda: pruning.fixed_keep_ratio_loss([torch.ones(2, 3)], 1.5), ValueError, "[0, 1]"),
    row("stages", lambda: pruning.svit_keep_targets(3, 0.7, 4), ValueError, "[1, num_gated = 3]"),
    row("model", lambda: pruning.gate_masks("model"), TypeError, "nn.Module"),
    row("count", lambda: pruning.kept_indices(torch.ones(2, 5, dtype=torch.bool), 6), ValueError, "int in [0, 5]"),
    row("count", lambda: pruning.kept_indices(torch.eye(5, dtype=torch.bool)[:2], 2), ValueError, "more than"),
    row("indices", lambda: pruning.gather_tokens(TOKENS, torch.tensor([[0, 5], [1, 2]])), ValueError, "[0, 5)"),
    row("indices", lambda: pruning.gather_tokens(TOKENS, torch.zeros(2, 2)), TypeError, "int64"),
    row("updated", lambda: pruning.scatter_kept(TOKENS, torch.zeros(2, 2, 8), torch.zeros(2, 2, dtype=torch.long),
                                                torch.ones(2, 2, dtype=torch.bool)), ValueError, "(B, K, C)"),
    # ---- datasets
    row("dataset", lambda: data.load("imagenet"), ValueError, "one of"),
    row("dataset", lambda: data.load(3), TypeError, "one of"),
    row("image_sise", lambda: data.load("digits", image_sise=32), TypeError, "takes no options"),
    row("image_size", lambda: data.digits(image_size=4), ValueError, "int >= 8"),
    row("image_size", lambda: data.digit_pairs(image_size=32.0), TypeError, "int >= 16"),
    row("seed", lambda: data.digits(seed="0"), TypeError, "int"),
    row("test_fraction", lambda: data.digits(test_fraction=1.0), ValueError, "between 0 and 1"),
    row("train_size", lambda: data.digit_pairs(train_size=0), ValueError, "int >= 1"),
    row("classes", lambda: data.digit_pairs(classes=(3,)), ValueError, "two or more distinct digits"),
    row("classes", lambda: data.digit_pairs(classes="01"), TypeError, "sequence"),
    # ---- the training config
    row("epochs", lambda: TrainConfig(epochs="3"), TypeError, "int >= 1"),
    row("epochs", lambda: TrainConfig(epochs=0), ValueError, "int >= 1"),
    row("lr", lambda: TrainConfig(lr=0), ValueError, "float > 0"),
    row("lr", lambda: TrainConfig(lr="1e-3"), TypeError, "float > 0"),
    row("keep_ratio", lambda: TrainConfig(keep_ratio=2), ValueError, "float in [0, 1]"),
    row("prune_keep_ratio", lambda: TrainConfig(prune_keep_ratio=-1), ValueError, "float in [0, 1]"),
    row("fuse", lambda: TrainConfig(fuse="true"), TypeError, "bool"),
    row("attention_layers", lambda: TrainConfig(attention_layers="0 1"), TypeError, "list of block indices"),
    row("scoring", lambda: TrainConfig(scoring="max"), ValueError, "one of"),
    row("model", lambda: TrainConfig(model="giant"), ValueError, "one of"),
    row("device", lambda: TrainConfig(device="gpu7"), ValueError, "torch device"),
    row("out_dir", lambda: TrainConfig(out_dir=None), TypeError, "str"),
    row("pruning", lambda: TrainConfig(pruning="drop"), ValueError, "one of"),
    row("prune_loss_weight", lambda: TrainConfig(prune_loss_weight=-4), ValueError, "float >= 0"),
    row("prune_loss_weight", lambda: TrainConfig(prune_loss_weight="4"), TypeError, "float >= 0"),
    row("prune_targets", lambda: TrainConfig(prune_targets=0.7), TypeError, "list of keep ratios"),
    row("prune_targets", lambda: TrainConfig(prune_targets=[0.7, 1.5]), ValueError, "float in [0, 1]"),
    row("prune_targets", lambda: TrainConfig(prune_targets=["0.7"]), TypeError, "float in [0, 1]"),
    row("prune_targets", lambda: TrainConfig(prune_layers=[1, 2], prune_targets=[0.7]), ValueError, "one keep ratio per block"),
    row("prune_layers", lambda: TrainConfig(prune_layers=[1.5]), TypeError, "list of block indices"),
    row("clip_grad_norm", lambda: TrainConfig(clip_grad_norm=-1.0), ValueError, "float >= 0"),
    row("clip_grad_norm", lambda: TrainConfig(clip_grad_norm="1"), TypeError, "float >= 0"),
    row("warmup_epochs", lambda: TrainConfig(warmup_epochs=-0.5), ValueError, "float >= 0"),
    row("init_from", lambda: TrainConfig(init_from=None), TypeError, "str"),
    row("qk_init", lambda: TrainConfig(qk_init="svd"), ValueError, "one of"),
    row("epochz", lambda: TrainConfig.from_dict({"epochz": 3}), ValueError, "unknown config keys"),
    row("config", lambda: TrainConfig.from_dict([("epochs", 3)]), TypeError, "JSON object"),
]


def test_the_table_covers_at_least_40_bad_inputs():
    assert len(BAD_INPUTS) >= 40


@pytest.mark.parametrize("argument, call, error, expected", numbered(BAD_INPUTS))
def test_bad_input_is_a_clear_error(argument, call, error, expected):
    with pytest.raises(error) as raised:
        call()
    message = str(raised.value)
    assert re.search(rf"(?<![\w.]){re.escape(argument)}(?!\w)", message), f"{argument!r} not named in: {message}"
    assert expected in message, f"{expected!r} not in: {message}"
