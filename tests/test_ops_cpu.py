"""The C++ CPU path through the public ops, against the reference (SPEC §6)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import bspf_ext
from bspf_ext import reference
from support import assert_close_to_reference, random_inputs

BLOCKS = [1, 2, 7, 16, 32, 64]


@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("n", [1, 5, 64, 197, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_matches_reference(block_size, n, dtype):
    qk, v = random_inputs(2, 3, n, 16, 8, dtype=dtype)
    assert_close_to_reference(qk, v, block_size=block_size, keep_ratio=0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_long_sequence(dtype):
    qk, v = random_inputs(1, 1, 1024, 32, dtype=dtype)
    assert_close_to_reference(qk, v, block_size=32, keep_ratio=0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_backward_at_n_4096(dtype):
    # The longest sequence docs/design.md gives memory figures for: outputs and gradients
    # against the reference (its float64 autograd at this N needs about 2 GB).
    qk, v = random_inputs(1, 1, 4096, 16, 8, dtype=dtype, seed=4)
    assert_close_to_reference(qk, v, block_size=16, keep_ratio=0.5)
    grad = torch.randn(1, 1, 4096, 8, dtype=torch.float64).to(dtype)
    a, b = qk.clone().requires_grad_(), v.clone().requires_grad_()
    got = torch.autograd.grad(bspf_ext.block_symmetric_attention(a, b, block_size=16), (a, b), grad)
    mask = bspf_ext.block_mask(qk, block_size=16)
    match = torch.ops.bspf_ext.forward(qk, v, reference.box_score_kernel(dtype), 16, 0.5, True, 16**-0.5)[2].long()
    a64, b64 = qk.double().requires_grad_(), v.double().requires_grad_()
    out64 = reference.block_symmetric_attention(a64, b64, block_size=16, mask=mask, match=match)
    expected = torch.autograd.grad(out64, (a64, b64), grad.double())
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=rtol * max(e.abs().max().item(), 1.0))


@pytest.mark.parametrize("keep_ratio", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("fuse", [True, False])
def test_forward_keep_ratios_and_fuse(keep_ratio, fuse):
    qk, v = random_inputs(2, 2, 77, 12, 6)
    w = torch.softmax(torch.randn(9, dtype=torch.float64), 0).reshape(3, 3)
    w = (w + w.T) / 2
    assert_close_to_reference(qk, v, w, block_size=16, keep_ratio=keep_ratio, fuse=fuse)


def test_limits_are_dense_and_chunk_attention():
    qk, v = random_inputs(2, 3, 197, 16)
    dense = F.scaled_dot_product_attention(qk, qk, v)
    torch.testing.assert_close(bspf_ext.block_symmetric_attention(qk, v, keep_ratio=1.0), dense)
    chunk = torch.arange(197) // 16
    chunked = F.scaled_dot_product_attention(qk, qk, v, attn_mask=chunk[:, None] == chunk[None, :])
    torch.testing.assert_close(bspf_ext.block_symmetric_attention(qk, v, keep_ratio=0.0), chunked)


@pytest.mark.parametrize("n,block_size", [(197, 16), (37, 7), (64, 64), (9, 1)])
@pytest.mark.parametrize("keep_ratio", [0.0, 0.5, 1.0])
def test_block_mask_matches_reference(n, block_size, keep_ratio):
    qk, _ = random_inputs(2, 2, n, 8)
    got = bspf_ext.block_mask(qk, block_size=block_size, keep_ratio=keep_ratio)
    assert got.dtype == torch.bool
    assert torch.equal(got, reference.block_mask(qk, block_size=block_size, keep_ratio=keep_ratio))


@pytest.mark.parametrize("n,block_size,keep_ratio", [(197, 16, 0.5), (50, 7, 0.25), (33, 1, 0.5), (70, 64, 1.0)])
@pytest.mark.parametrize("fuse", [True, False])
def test_gradients_match_reference_autograd(n, block_size, keep_ratio, fuse):
    qk, v = random_inputs(2, 2, n, 12, 6)
    grad = torch.randn(2, 2, n, 6, dtype=torch.float64)
    kwargs = dict(block_size=block_size, keep_ratio=keep_ratio, fuse=fuse)
    got = torch.autograd.grad(
        bspf_ext.block_symmetric_attention(*(t.requires_grad_() for t in (qk, v)), **kwargs), (qk, v), grad
    )
    expected = torch.autograd.grad(reference.block_symmetric_attention(qk, v, **kwargs), (qk, v), grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n,block_size,fuse", [(23, 5, True), (16, 4, False), (9, 2, True)])
def test_gradcheck(n, block_size, fuse):
    qk, v = random_inputs(1, 2, n, 4, 3)
    qk.requires_grad_(), v.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: bspf_ext.block_symmetric_attention(a, b, block_size=block_size, fuse=fuse), (qk, v)
    )


def test_score_kernel_gradient_is_zero():
    qk, v = random_inputs(1, 1, 20, 4)
    w = reference.box_score_kernel(torch.float64).requires_grad_()
    bspf_ext.block_symmetric_attention(qk, v, w, block_size=4).sum().backward()
    assert torch.equal(w.grad, torch.zeros(3, 3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype):
    qk, v = random_inputs(2, 2, 21, 8, 4, dtype=dtype)
    kernel = reference.box_score_kernel(dtype)
    args = (qk.requires_grad_(), v.requires_grad_(), kernel, 8, 0.5, True, 0.3)
    torch.library.opcheck(torch.ops.bspf_ext.forward.default, args)
    torch.library.opcheck(torch.ops.bspf_ext.block_mask.default, (qk.detach(), kernel, 8, 0.5, 0.3))
    out, *saved = torch.ops.bspf_ext.forward(qk.detach(), v.detach(), kernel, 8, 0.5, True, 0.3)
    grad = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.bspf_ext.backward.default, (grad, qk.detach(), v.detach(), *saved, 8, True, 0.3)
    )


def test_bitwise_deterministic():
    qk, v = random_inputs(4, 3, 197, 16, dtype=torch.float32)
    qk.requires_grad_(), v.requires_grad_()
    grad = torch.randn(4, 3, 197, 16)
    runs = []
    for _ in range(3):
        out = bspf_ext.block_symmetric_attention(qk, v)
        runs.append((out, *torch.autograd.grad(out, (qk, v), grad)))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def test_strided_and_expanded_inputs():
    base, v = random_inputs(2, 40, 3, 16, 8)  # (B, N, H, D) then transposed: non-contiguous
    qk = base.transpose(1, 2)
    v = v.transpose(1, 2)
    assert not qk.is_contiguous()
    assert_close_to_reference(qk, v, block_size=8, keep_ratio=0.5)
    one, vone = random_inputs(1, 1, 30, 8)
    assert_close_to_reference(one.expand(2, 3, 30, 8), vone.expand(2, 3, 30, 8), block_size=7, keep_ratio=0.5)
    grad = torch.randn(2, 3, 40, 8, dtype=torch.float64).transpose(-1, -2).contiguous().transpose(-1, -2)
    got = torch.autograd.grad(bspf_ext.block_symmetric_attention(qk.requires_grad_(), v), qk, grad)[0]
    expected = torch.autograd.grad(reference.block_symmetric_attention(qk, v), qk, grad)[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_empty_and_single_token():
    for shape in [(2, 3, 0, 4), (0, 3, 7, 4), (2, 0, 7, 4)]:
        qk = torch.zeros(shape, requires_grad=True)
        out = bspf_ext.block_symmetric_attention(qk, torch.zeros(*shape[:3], 5))
        assert out.shape == (*shape[:3], 5)
        out.sum().backward()
        assert qk.grad.shape == shape
        assert bspf_ext.block_mask(qk.detach()).shape == (*shape[:3], shape[2])
    qk, v = random_inputs(2, 2, 1, 4)
    torch.testing.assert_close(bspf_ext.block_symmetric_attention(qk, v), v)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 300))
    return dict(
        b=draw(st.integers(1, 2)),
        h=draw(st.integers(1, 2)),
        n=n,
        d=draw(st.integers(1, 128)),
        dv=draw(st.integers(1, 16)),
        block_size=draw(st.integers(1, 64)),
        keep_ratio=draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "expanded"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _layout(p, dtype):
    b, h, n, d, dv = p["b"], p["h"], p["n"], p["d"], p["dv"]
    if p["layout"] == "transposed":
        qk, v = random_inputs(b, n, h, d, dv, dtype=dtype, seed=p["seed"])
        return qk.transpose(1, 2), v.transpose(1, 2)
    if p["layout"] == "expanded":
        qk, v = random_inputs(1, h, n, d, dv, dtype=dtype, seed=p["seed"])
        return qk.expand(b, h, n, d), v.expand(b, h, n, dv)
    return random_inputs(b, h, n, d, dv, dtype=dtype, seed=p["seed"])


@given(problems())
def test_hypothesis_float64(p):
    qk, v = _layout(p, torch.float64)
    assert_close_to_reference(qk, v, block_size=p["block_size"], keep_ratio=p["keep_ratio"])


@given(problems())
def test_hypothesis_float32(p):
    qk, v = _layout(p, torch.float32)
    assert_close_to_reference(qk, v, block_size=p["block_size"], keep_ratio=p["keep_ratio"])
