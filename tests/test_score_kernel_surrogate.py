"""The score kernel's surrogate gradient (docs/spec.md §4a) through the public function: the
op (bspf_ext::score_kernel_grad, here its CPU kernel) against the reference's linear-space
form, gradcheck of the relaxation it differentiates, and the forward and the qk/v gradients
unchanged by it. The kernels' own cases are in test_score_kernel_grad_cpu.py and the CUDA
files beside it."""

import pytest
import torch

import bspf_ext
from bspf_ext import reference
from support import kernel_choices, random_inputs

CASES = [  # n, block_size, keep_ratio, fuse
    (37, 8, 0.5, True),
    (40, 8, 0.3, False),
    (50, 7, 0.25, True),
    (64, 16, 0.5, True),
    (23, 5, 0.7, True),
    (33, 1, 0.5, True),  # one-token blocks: no block has a choice, the gradient is 0
    (30, 6, 0.0, True),  # k = 0 everywhere: likewise
    (30, 6, 1.0, True),  # k = |block|: likewise
]


def _kernel(seed=0, dtype=torch.float64):
    w = torch.softmax(torch.randn(9, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), 0)
    w = w.reshape(3, 3)
    return ((w + w.T) / 2).to(dtype)


def _grads(fn, qk, v, w, grad):
    qk, v, w = (t.detach().clone().requires_grad_() for t in (qk, v, w))
    return torch.autograd.grad(fn(qk, v, w), (qk, v, w), grad, allow_unused=True)


@pytest.mark.parametrize("n,block_size,keep_ratio,fuse", CASES)
def test_op_matches_the_reference_surrogate(n, block_size, keep_ratio, fuse):
    qk, v = random_inputs(2, 2, n, 8, 6)
    grad = torch.randn(2, 2, n, 6, dtype=torch.float64)
    kwargs = dict(block_size=block_size, keep_ratio=keep_ratio, fuse=fuse, score_kernel_grad="surrogate")
    got = _grads(lambda a, b, w: bspf_ext.block_symmetric_attention(a, b, w, **kwargs), qk, v, _kernel(), grad)
    expected = _grads(lambda a, b, w: reference.block_symmetric_attention(a, b, w, **kwargs), qk, v, _kernel(), grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    decided = block_size > 1 and 0.0 < keep_ratio < 1.0
    assert (got[2].abs().sum() > 0) == decided


def test_float32_matches_the_float64_surrogate():
    qk, v = random_inputs(2, 3, 70, 16, 8, dtype=torch.float32, seed=2)
    grad = torch.randn(2, 3, 70, 8)
    kwargs = dict(block_size=16, keep_ratio=0.5, score_kernel_grad="surrogate")
    got = _grads(lambda a, b, w: bspf_ext.block_symmetric_attention(a, b, w, **kwargs), qk, v,
                 _kernel(dtype=torch.float32), grad)[2]
    # The float64 reference with the kernel's own mask and matches (SPEC §6 near-ties).
    _, mask, match = kernel_choices(qk, v, _kernel(dtype=torch.float32), block_size=16, keep_ratio=0.5)
    expected = _grads(
        lambda a, b, w: reference.block_symmetric_attention(a, b, w, mask=mask, match=match, **kwargs),
        qk.double(), v.double(), _kernel(), grad.double(),
    )[2]
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("n,block_size,keep_ratio,fuse", [(37, 8, 0.5, True), (40, 8, 0.3, False), (23, 5, 0.7, True)])
def test_gradcheck_of_the_relaxation(n, block_size, keep_ratio, fuse):
    # M + M̃(W) − M̃(W₀) is a smooth function of W that equals the forward at W₀; the
    # surrogate is its derivative there. gradcheck checks that derivative numerically, and
    # the op's surrogate equals it.
    qk, v = random_inputs(1, 2, n, 4, 3, seed=5)
    anchor = _kernel(seed=1)

    def relaxed(w):
        return reference._surrogate_attention(
            qk, v, w, block_size, keep_ratio, fuse, 4**-0.5, None, None, anchor_kernel=anchor
        )

    w = anchor.clone().requires_grad_()
    assert torch.autograd.gradcheck(relaxed, (w,))
    grad = torch.randn(1, 2, n, 3, dtype=torch.float64)
    (expected,) = torch.autograd.grad(relaxed(w), w, grad)
    got = _grads(
        lambda a, b, k: bspf_ext.block_symmetric_attention(
            a, b, k, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse, score_kernel_grad="surrogate"
        ),
        qk, v, anchor, grad,
    )[2]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_forward_and_qk_v_gradients_do_not_depend_on_the_option():
    qk, v = random_inputs(2, 2, 45, 8, 5, seed=3)
    grad = torch.randn(2, 2, 45, 5, dtype=torch.float64)
    outs, grads = [], []
    for option in ("zero", "surrogate"):
        a, b, w = (t.clone().requires_grad_() for t in (qk, v, _kernel()))
        out = bspf_ext.block_symmetric_attention(a, b, w, block_size=8, score_kernel_grad=option)
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out, (a, b, w), grad))
    assert torch.equal(outs[0], outs[1])
    for g0, g1 in zip(grads[0][:2], grads[1][:2]):
        assert torch.equal(g0, g1)
    assert torch.equal(grads[0][2], torch.zeros(3, 3, dtype=torch.float64))
    assert grads[1][2].abs().sum() > 0


def test_unknown_option_is_a_clear_error():
    qk, v = random_inputs(1, 1, 8, 4)
    with pytest.raises(ValueError, match="score_kernel_grad must be one of"):
        bspf_ext.block_symmetric_attention(qk, v, score_kernel_grad="straight-through")
    with pytest.raises(TypeError, match="score_kernel_grad"):
        bspf_ext.block_symmetric_attention(qk, v, score_kernel_grad=True)


def test_meta_tensors_go_through_the_fake_implementation():
    qk = torch.empty(2, 3, 50, 8, device="meta")
    w = torch.full((3, 3), 1 / 9, device="meta", requires_grad=True)
    out = bspf_ext.block_symmetric_attention(qk, qk, w, score_kernel_grad="surrogate")
    assert out.shape == (2, 3, 50, 8) and out.device.type == "meta"
