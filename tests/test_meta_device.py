"""Meta tensors (shapes without data) go through the operator's fake implementation, so
models built on the meta device — deferred initialisation, FLOP counting — run."""

import pytest
import torch

import bspf_ext
from bspf_ext import models


def test_op_forward_and_backward_on_meta():
    qk = torch.empty(2, 3, 37, 8, device="meta", requires_grad=True)
    v = torch.empty(2, 3, 37, 5, device="meta", requires_grad=True)
    out = bspf_ext.block_symmetric_attention(qk, v, block_size=8)
    assert out.device.type == "meta" and out.shape == (2, 3, 37, 5)
    out.sum().backward()
    assert qk.grad.shape == qk.shape and v.grad.shape == v.shape and qk.grad.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_on_meta_like_a_cuda_model(dtype):
    # A model meant for CUDA may be laid out on meta in the dtype the CUDA kernels take.
    qk = torch.empty(1, 2, 20, 8, device="meta", dtype=dtype)
    assert bspf_ext.block_symmetric_attention(qk, qk).dtype == dtype


def test_block_mask_on_meta():
    mask = bspf_ext.block_mask(torch.empty(1, 2, 40, 8, device="meta"), block_size=16)
    assert mask.device.type == "meta" and mask.shape == (1, 2, 40, 40) and mask.dtype == torch.bool


def test_meta_score_kernel_is_not_read():
    qk = torch.empty(1, 1, 10, 4, device="meta")
    assert bspf_ext.block_symmetric_attention(qk, qk, torch.empty(3, 3, device="meta")).shape == qk.shape


def test_bspf_vit_built_and_run_on_meta():
    with torch.device("meta"):
        model = models.vit_tiny("bspf", img_size=32, patch_size=8, depth=2, num_classes=10)
    assert all(p.device.type == "meta" for p in model.parameters())
    logits = model(torch.empty(4, 3, 32, 32, device="meta"))
    assert logits.shape == (4, 10) and logits.device.type == "meta"
    logits.sum().backward()
    assert model.blocks[0].attn.qk.weight.grad.device.type == "meta"


def test_meta_model_materialises_and_then_computes():
    # Deferred initialisation: lay out on meta, allocate on the CPU, then initialise.
    with torch.device("meta"):
        model = models.vit_tiny("bspf", img_size=16, patch_size=8, depth=1, num_classes=3)
    model = model.to_empty(device="cpu")
    model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    with torch.no_grad():
        model.pos_embed.normal_(std=0.02)
        model.cls_token.zero_()
        model.blocks[0].attn.theta.zero_()
    logits = model(torch.rand(2, 3, 16, 16))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
