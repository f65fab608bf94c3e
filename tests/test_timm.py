"""timm models: bspf_ext.swap.timm and bspf_ext.models.load_timm_state_dict, for real.

Every model is built with pretrained=False (no network) at a small image size. At
keep_ratio 1 with W_q = W_k (and q_norm = k_norm) BSPF computes dense attention, so the
swapped or loaded model must give the dense timm model's output; at keep_ratio < 1 it must
be a working model, forward and backward.

Without timm the module is skipped, except in CI (.ci/run sets BSPF_REQUIRE_OPTIONAL=1),
where a missing timm fails. Where torchvision does not load, tests/conftest.py provides the
stand-in in tests/timm_support.
"""

import os

import pytest
import torch

if os.environ.get("BSPF_REQUIRE_OPTIONAL") == "1":
    import timm
else:
    timm = pytest.importorskip("timm")

from timm.layers import Attention  # noqa: E402

from bspf_ext import models, swap  # noqa: E402
from bspf_ext.nn import BlockSymmetricAttention  # noqa: E402

# (id, timm model name, create_model options, image size). patch 16 at 64 px: 16 patches.
# Every model is built with DEPTH blocks: the width, heads and block layout are the named
# model's, and two blocks check everything a block has (a 2-core CI machine cannot afford 12).
CASES = {
    "vit_tiny": ("vit_tiny_patch16_224", {}, 64),
    "vit_small": ("vit_small_patch16_224", {}, 64),
    "vit_base": ("vit_base_patch16_224", {}, 64),
    "deit_tiny": ("deit_tiny_patch16_224", {}, 64),
    "deit_small_distilled": ("deit_small_distilled_patch16_224", {}, 64),
    "deit3_small_layerscale": ("deit3_small_patch16_224", {}, 64),
    # Register tokens: with a class token and LayerScale (DINOv2), and with average pooling, no class token.
    "vit_small_reg4_dinov2": ("vit_small_patch14_reg4_dinov2", {}, 56),
    "vit_medium_reg4_gap": ("vit_medium_patch16_reg4_gap_256", {}, 64),
    "vit_tiny_qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}, 64),
    "vit_tiny_dynamic_img_size": ("vit_tiny_patch16_224", {"dynamic_img_size": True}, 64),
}
DEPTH = 2
# Small enough for a 2-core CI machine, large enough to exercise every block.
FAST = ["vit_tiny", "deit_small_distilled", "deit3_small_layerscale", "vit_small_reg4_dinov2",
        "vit_medium_reg4_gap", "vit_tiny_qk_norm", "vit_tiny_dynamic_img_size"]


def _images(size, b=2, dtype=torch.float64, width=None):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, size, width or size, generator=gen, dtype=torch.float64).to(dtype)


def _perturb_and_tie(model):
    """Non-zero biases, LayerScale and norm affines far from their init (so all of them take
    part), then W_k := W_q, b_k := b_q and k_norm := q_norm in every attention layer."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif name.endswith("gamma") or (name.endswith("weight") and p.dim() == 1):  # LayerScale, norms
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        for module in model.modules():
            if type(module) is Attention:
                q, _, v = module.qkv.weight.chunk(3)
                module.qkv.weight.copy_(torch.cat([q, q, v]))
                if module.qkv.bias is not None:
                    qb, _, vb = module.qkv.bias.chunk(3)
                    module.qkv.bias.copy_(torch.cat([qb, qb, vb]))
                if not isinstance(module.q_norm, torch.nn.Identity):
                    module.k_norm.load_state_dict(module.q_norm.state_dict())
    return model


def _timm_model(case, *, fused_attn=True, dtype=torch.float64, tie=True):
    name, options, size = CASES[case]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=size, depth=DEPTH, **options)
    if tie:
        _perturb_and_tie(model)
    attention = [m for m in model.modules() if type(m) is Attention]
    assert attention, f"{name} has no timm Attention"
    for module in attention:
        module.fused_attn = fused_attn
    return model.to(dtype).eval(), size


def _qk_init(case):
    # "spectral" rotates each head's dimensions, which a per-dimension q/k norm forbids.
    return "mean" if CASES[case][1].get("qk_norm") else "spectral"


def _sizes(case, size):
    """The image sizes a case is checked at: a dynamic_img_size model at two more."""
    if CASES[case][1].get("dynamic_img_size"):
        return [(size, size), (48, 48), (32, 80)]
    return [(size, size)]


def test_timm_imports_and_its_torchvision():
    import torchvision

    assert hasattr(timm, "create_model")
    if getattr(torchvision, "STAND_IN", False):
        # The stand-in's FrozenBatchNorm2d is a real one: an eval-mode BatchNorm2d.
        from torchvision.ops.misc import FrozenBatchNorm2d

        bn = torch.nn.BatchNorm2d(4).eval()
        with torch.no_grad():
            for t in (bn.weight, bn.bias, bn.running_mean):
                t.normal_()
            bn.running_var.uniform_(0.5, 2)
        frozen = FrozenBatchNorm2d(4)
        frozen.load_state_dict(bn.state_dict())
        x = torch.randn(2, 4, 3, 3)
        torch.testing.assert_close(frozen(x), bn(x))
        with pytest.raises(NotImplementedError, match="stand-in"):
            torchvision.transforms.ToTensor()


# Every case with timm's fused attention (F.scaled_dot_product_attention), the fast ones
# with its explicit softmax path too (timm's fused_attn off).
SWAP_CASES = [(case, True) for case in CASES] + [(case, False) for case in FAST]


@pytest.mark.parametrize("case, fused_attn", SWAP_CASES,
                         ids=[f"{case}-{'fused' if fused else 'unfused'}" for case, fused in SWAP_CASES])
def test_swap_at_keep_ratio_one_gives_the_dense_output(case, fused_attn):
    model, size = _timm_model(case, fused_attn=fused_attn)
    inputs = [_images(h, width=w) for h, w in _sizes(case, size)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    dense_count = sum(type(m) is Attention for m in model.modules())
    assert swap.timm(model, keep_ratio=1.0, block_size=8, qk_init=_qk_init(case)) is model
    swapped = [m for m in model.modules() if isinstance(m, BlockSymmetricAttention)]
    assert len(swapped) == dense_count and not any(type(m) is Attention for m in model.modules())
    with torch.no_grad():
        for x, want in zip(inputs, expected):
            torch.testing.assert_close(model(x), want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("case", FAST)
def test_swapped_bspf_model_trains(case):
    model, size = _timm_model(case, dtype=torch.float32, tie=False)
    swap.timm(model, keep_ratio=0.5, block_size=4, qk_init=_qk_init(case))
    model.train()
    x = _images(size, dtype=torch.float32)
    out = model(x)
    if isinstance(out, tuple):  # a distilled DeiT in training: (class head, distillation head)
        out = out[0] + out[1]
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    layer = next(m for m in model.modules() if isinstance(m, BlockSymmetricAttention))
    assert layer.qk.weight.grad.abs().sum() > 0 and layer.v.weight.grad.abs().sum() > 0
    with torch.no_grad():  # and a pruned model is not the dense one
        model.eval()
        dense, _ = _timm_model(case, dtype=torch.float32, tie=False)  # the same seed: the same weights
        assert not torch.allclose(model(x), dense(x))


# The timm models bspf_ext's own VisionTransformer represents: class token, token pooling,
# no distillation or register token, no LayerScale, no qk_norm.
PLAIN = {"vit_tiny": "vit_tiny", "vit_small": "vit_small", "vit_base": "vit_base", "deit_tiny": "deit_tiny"}


@pytest.mark.parametrize("case", list(PLAIN))
def test_load_timm_state_dict_at_keep_ratio_one_gives_the_dense_output(case):
    reference, size = _timm_model(case)
    ours = getattr(models, PLAIN[case])("bspf", img_size=size, depth=DEPTH, keep_ratio=1.0, block_size=8)
    ours = ours.double().eval()
    models.load_timm_state_dict(ours, reference.state_dict())
    x = _images(size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("case", ["vit_tiny", "deit_tiny"])
def test_load_timm_state_dict_gives_a_working_bspf_model(case):
    reference, size = _timm_model(case, dtype=torch.float32, tie=False)
    ours = getattr(models, PLAIN[case])("bspf", img_size=size, depth=DEPTH, keep_ratio=0.5, block_size=4)
    models.load_timm_state_dict(ours, reference.state_dict())
    x = _images(size, dtype=torch.float32)
    out = ours(x)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters() if p.requires_grad)


@pytest.mark.parametrize("case, says", [
    ("deit_small_distilled", "distillation token"),
    ("deit3_small_layerscale", "LayerScale"),
    ("vit_small_reg4_dinov2", "register tokens"),
    ("vit_medium_reg4_gap", "register tokens"),
    ("vit_tiny_qk_norm", "qk_norm"),
])
def test_load_timm_state_dict_names_what_the_builtin_vit_lacks(case, says):
    reference, size = _timm_model(case, dtype=torch.float32, tie=False)
    ours = models.vit_small("bspf", img_size=64, depth=DEPTH)
    with pytest.raises(ValueError, match=f"(?s){says}.*bspf_ext.swap.timm"):
        models.load_timm_state_dict(ours, reference.state_dict())


def test_swapped_timm_model_exports():
    """torch.export of a timm model after the swap: the program holds the BSPF op, matches
    eager, and takes any batch size."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=10)
    swap.timm(model, keep_ratio=0.5, block_size=4)
    model.eval()
    x = _images(32, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("bspf_ext.forward.default") == 2
    with torch.no_grad():
        for images in (x, _images(32, b=5, dtype=torch.float32)):
            torch.testing.assert_close(program.module()(images), model(images), rtol=1e-6, atol=1e-6)
