"""Conversion from dense (timm-format) checkpoints and in-place patching."""

import sys

import pytest
import torch

from bspf_ext import models, swap
from bspf_ext.models import convert
from bspf_ext.nn import BlockSymmetricAttention, DenseAttention

SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=10, block_size=4)


def _images(b=2, size=32):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _tie_q_and_k(state):
    """W_k := W_q (and b_k := b_q) in every block, as a dense model with shared QK."""
    state = dict(state)
    for key in [k for k in state if k.endswith("attn.qkv.weight") or k.endswith("attn.qkv.bias")]:
        q, _, v = state[key].chunk(3, dim=0)
        state[key] = torch.cat([q, q, v])
    return state


def _dense_tied(**overrides):
    dense = models.vit_tiny("dense", **{**SMALL, **overrides}).double().eval()
    with torch.no_grad():  # make biases non-zero so their conversion is exercised too
        for name, p in dense.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.05)
    dense.load_state_dict(_tie_q_and_k(dense.state_dict()))
    return dense


@pytest.mark.parametrize("qk_init", convert.QK_INITS)
def test_converted_keep_ratio_one_reproduces_dense_with_tied_qk(qk_init):
    dense = _dense_tied()
    bspf = models.vit_tiny("bspf", keep_ratio=1.0, **SMALL).double().eval()
    models.load_timm_state_dict(bspf, dense.state_dict(), qk_init=qk_init)
    images = _images()
    torch.testing.assert_close(bspf(images), dense(images), rtol=1e-9, atol=1e-9)


def test_conversion_of_some_layers_only():
    dense = _dense_tied()
    mixed = models.vit_tiny("bspf", attention_layers=[1], keep_ratio=1.0, **SMALL).double().eval()
    models.load_timm_state_dict(mixed, dense.state_dict())
    assert isinstance(mixed.blocks[0].attn, DenseAttention)
    images = _images()
    torch.testing.assert_close(mixed(images), dense(images), rtol=1e-9, atol=1e-9)


def test_untied_checkpoint_loads_and_differs():
    dense = models.vit_tiny("dense", **SMALL).double().eval()
    bspf = models.vit_tiny("bspf", keep_ratio=1.0, **SMALL).double().eval()
    models.load_timm_state_dict(bspf, dense.state_dict())
    images = _images()
    out = bspf(images)
    assert torch.isfinite(out).all() and not torch.allclose(out, dense(images))


def _random_pair(out_dim=12, in_dim=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(out_dim, in_dim)] * 2 + [(out_dim,)] * 2]


def test_mean_q_k_rules():
    w_q, w_k, b_q, b_k = _random_pair()
    w, b = convert.shared_qk_projection(w_q, w_k, b_q, b_k, num_heads=3, qk_init="mean")
    torch.testing.assert_close(w, (w_q + w_k) / 2)
    torch.testing.assert_close(b, (b_q + b_k) / 2)
    assert torch.equal(convert.shared_qk_projection(w_q, w_k, num_heads=3, qk_init="q")[0], w_q)
    assert torch.equal(convert.shared_qk_projection(w_q, w_k, num_heads=3, qk_init="k")[0], w_k)


def _head_forms(w, b, num_heads):
    """Per head, the bilinear logit form AᵀA on [x, 1] of the affine map x -> Wx + b."""
    a = torch.cat([w, b[:, None]], dim=1)
    d = w.shape[0] // num_heads
    return [a[h * d : (h + 1) * d].T @ a[h * d : (h + 1) * d] for h in range(num_heads)]


def test_spectral_is_exact_when_q_equals_k():
    w_q, _, b_q, _ = _random_pair()
    w, b = convert.shared_qk_projection(w_q, w_q, b_q, b_q, num_heads=3)
    for got, want in zip(_head_forms(w, b, 3), _head_forms(w_q, b_q, 3)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_spectral_approximates_the_logit_form_best(seed):
    """spectral minimises ‖W_qkᵀW_qk − sym(W_qᵀW_k)‖ per head; no other rule does better."""
    w_q, w_k, b_q, b_k = _random_pair(seed=seed)
    q_forms = _head_forms(w_q, b_q, 3)
    # sym(A_qᵀ A_k) per head, by polarisation: (A_q + A_k)ᵀ(A_q + A_k) − A_qᵀA_q − A_kᵀA_k = 2 sym(A_qᵀA_k).
    sum_forms = _head_forms(w_q + w_k, b_q + b_k, 3)
    k_forms = _head_forms(w_k, b_k, 3)
    targets = [0.5 * (s - q - k) for s, q, k in zip(sum_forms, q_forms, k_forms)]
    errors = {}
    for rule in convert.QK_INITS:
        w, b = convert.shared_qk_projection(w_q, w_k, b_q, b_k, num_heads=3, qk_init=rule)
        errors[rule] = sum(float((f - t).norm()) for f, t in zip(_head_forms(w, b, 3), targets))
    assert errors["spectral"] <= min(errors["mean"], errors["q"], errors["k"]) + 1e-12


def test_attention_from_dense_and_swap_attention():
    dense = _dense_tied()
    images = _images()
    expected = dense(images)
    replaced = swap.swap_attention(dense, (DenseAttention,), layers=[1], keep_ratio=1.0, block_size=4)
    assert replaced == ["blocks.1.attn"]
    assert isinstance(dense.blocks[1].attn, BlockSymmetricAttention) and isinstance(dense.blocks[0].attn, DenseAttention)
    assert dense.blocks[1].attn.qk.weight.dtype == torch.float64
    torch.testing.assert_close(dense(images), expected, rtol=1e-9, atol=1e-9)


def test_attention_from_dense_with_qk_norm():
    torch.manual_seed(0)
    attn = DenseAttention(32, 4, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm).double()
    with torch.no_grad():
        q, _, v = attn.qkv.weight.chunk(3)
        attn.qkv.weight.copy_(torch.cat([q, q, v]))
        attn.qkv.bias.zero_()
        attn.q_norm.weight.normal_()
        attn.k_norm.load_state_dict(attn.q_norm.state_dict())
    with pytest.raises(ValueError, match="spectral"):
        convert.attention_from_dense(attn, keep_ratio=1.0)
    layer = convert.attention_from_dense(attn, qk_init="mean", keep_ratio=1.0, block_size=4)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), attn(x), rtol=1e-10, atol=1e-10)


def test_pos_embed_is_resampled_and_head_can_be_skipped():
    dense = models.vit_tiny("dense", **SMALL)
    bigger = models.vit_tiny("bspf", **{**SMALL, "img_size": 48, "num_classes": 5})
    with pytest.raises(ValueError, match="skip_head"):
        models.load_timm_state_dict(bigger, dense.state_dict())
    head = bigger.head.weight.clone()
    models.load_timm_state_dict(bigger, dense.state_dict(), skip_head=True)
    assert bigger.pos_embed.shape == (1, 37, 192) and torch.equal(bigger.head.weight, head)
    torch.testing.assert_close(bigger.pos_embed[:, :1], dense.pos_embed[:, :1])


def test_checkpoint_wrappers_are_unwrapped():
    dense = _dense_tied()
    bspf = models.vit_tiny("bspf", keep_ratio=1.0, **SMALL).double().eval()
    wrapped = {"model": {"module." + k: v for k, v in dense.state_dict().items()}}
    models.load_timm_state_dict(bspf, wrapped)
    images = _images()
    torch.testing.assert_close(bspf(images), dense(images), rtol=1e-9, atol=1e-9)


def test_bad_qk_init_and_missing_keys():
    model = models.vit_tiny("bspf", **SMALL)
    state = models.vit_tiny("dense", **SMALL).state_dict()
    with pytest.raises(ValueError, match="qk_init"):
        models.load_timm_state_dict(model, state, qk_init="average")
    del state["blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match="qkv.weight"):
        models.load_timm_state_dict(model, state)


def test_patch_timm_needs_timm(monkeypatch):
    # Checked whether timm is installed or not: a None in sys.modules makes its import fail.
    for name in ("timm", "timm.models", "timm.models.vision_transformer"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"needs timm \(pip install timm\)"):
        swap.timm(torch.nn.Linear(2, 2))


def _timm_vit():
    timm = pytest.importorskip("timm")
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10
    )
    return timm, model.double().eval()


def test_timm_checkpoint_loads_into_dense_model_exactly():
    _, reference = _timm_vit()
    ours = models.VisionTransformer(
        models.ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    ).double().eval()
    ours.load_state_dict(reference.state_dict())
    images = _images()
    torch.testing.assert_close(ours(images), reference(images), rtol=1e-10, atol=1e-10)


def test_patch_timm_swaps_in_place():
    _, model = _timm_vit()
    model.load_state_dict(_tie_q_and_k(model.state_dict()))
    images = _images()
    expected = model(images)
    assert swap.timm(model, keep_ratio=1.0, block_size=4) is model
    assert all(isinstance(block.attn, BlockSymmetricAttention) for block in model.blocks)
    torch.testing.assert_close(model(images), expected, rtol=1e-9, atol=1e-9)


def test_timm_attention_with_qk_norm_converts():
    timm = pytest.importorskip("timm")
    attn = timm.layers.Attention(48, 3, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm).double().eval()
    with torch.no_grad():
        q, _, v = attn.qkv.weight.chunk(3)
        attn.qkv.weight.copy_(torch.cat([q, q, v]))
        qb, _, vb = attn.qkv.bias.normal_().chunk(3)
        attn.qkv.bias.copy_(torch.cat([qb, qb, vb]))
        attn.q_norm.weight.normal_()
        attn.k_norm.load_state_dict(attn.q_norm.state_dict())
    layer = convert.attention_from_dense(attn, qk_init="mean", keep_ratio=1.0, block_size=4)
    x = torch.randn(2, 9, 48, dtype=torch.float64)
    torch.testing.assert_close(layer(x), attn(x), rtol=1e-10, atol=1e-10)
