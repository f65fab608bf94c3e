"""ViT/DeiT builders: sizes, attention choice per layer, timm key names, training, state_dict."""

import io

import pytest
import torch

from bspf_ext import models
from bspf_ext.nn import BlockSymmetricAttention, ChunkAttention, DenseAttention

SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=10, block_size=4)
KINDS = {"dense": DenseAttention, "chunk": ChunkAttention, "bspf": BlockSymmetricAttention}


def _images(b=2, size=32, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", models.ATTENTIONS)
def test_forward_shape(attention):
    model = models.vit_tiny(attention, **SMALL)
    assert model(_images()).shape == (2, 10)
    assert all(isinstance(block.attn, KINDS[attention]) for block in model.blocks)


@pytest.mark.parametrize(
    "builder, width, heads",
    [(models.vit_tiny, 192, 3), (models.vit_small, 384, 6), (models.vit_base, 768, 12), (models.deit_small, 384, 6)],
)
def test_standard_sizes(builder, width, heads):
    model = builder(depth=1, img_size=32, patch_size=16)  # one block keeps ViT-B cheap to build
    assert model.config.embed_dim == width and model.config.num_heads == heads
    assert model.blocks[0].attn.qkv.weight.shape == (3 * width, width)


def test_default_config_is_the_224_patch16_model():
    config = models.ViTConfig()
    assert (config.img_size, config.patch_size, config.num_tokens) == (224, 16, 197)


def test_attention_layers_choose_the_bspf_blocks():
    model = models.vit_tiny("bspf", attention_layers=[0, -1], **{**SMALL, "depth": 4})
    kinds = [type(block.attn) for block in model.blocks]
    assert kinds == [BlockSymmetricAttention, DenseAttention, DenseAttention, BlockSymmetricAttention]
    assert model.config.attention_layers == (0, 3)
    assert model(_images()).shape == (2, 10)


def test_bspf_options_reach_the_layers():
    model = models.vit_tiny("bspf", keep_ratio=0.25, fuse=False, scoring="center", **SMALL)
    attn = model.blocks[1].attn
    assert (attn.block_size, attn.keep_ratio, attn.fuse, attn.scoring) == (4, 0.25, False, "center")


def test_dense_model_uses_timm_parameter_names():
    keys = set(models.vit_tiny("dense", **SMALL).state_dict())
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    expected |= {f"{n}.{p}" for n in ("norm", "head") for p in ("weight", "bias")}
    for i in range(2):
        for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"}
    assert keys == expected


@pytest.mark.parametrize("attention", models.ATTENTIONS)
def test_training_step_reaches_every_learning_parameter(attention):
    model = models.vit_tiny(attention, drop_path_rate=0.1, **SMALL).train()
    loss = torch.nn.functional.cross_entropy(model(_images(4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.requires_grad, name
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_state_dict_round_trip():
    model = models.vit_tiny("bspf", keep_ratio=0.5, **SMALL).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)
    fresh = models.vit_tiny("bspf", keep_ratio=0.5, **SMALL).eval()
    fresh.load_state_dict(torch.load(buffer))
    images = _images()
    assert torch.equal(fresh(images), model(images))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(attention="sparse"),
        dict(img_size=30),
        dict(attention_layers=(12,)),
        dict(scoring="none"),
        dict(num_heads=5),
        dict(patch_size=0),
    ],
)
def test_bad_config(overrides):
    with pytest.raises(ValueError):
        models.ViTConfig(**{"embed_dim": 192, "num_heads": 3, **overrides})


def test_wrong_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match="images must have shape"):
        models.vit_tiny(**SMALL)(_images(size=48))


def test_dense_block_key_mask_hides_tokens():
    from bspf_ext.models.vit import Block, ViTConfig

    config = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=4, num_classes=0)
    block = Block(config, "dense", 0.0).eval()
    assert block.supports_key_mask
    x = torch.randn(2, 9, 32)
    keep = torch.tensor([[True] * 5 + [False] * 4, [True, False] * 4 + [True]])
    full = block(x, key_mask=keep)
    for b in range(2):
        alone = block(x[b : b + 1, keep[b]])
        torch.testing.assert_close(full[b, keep[b]], alone[0], rtol=1e-5, atol=1e-5)
    bspf_block = Block(config, "bspf", 0.0)
    assert not bspf_block.supports_key_mask
    with pytest.raises(ValueError, match="key_mask needs dense attention"):
        bspf_block(x, key_mask=keep)
