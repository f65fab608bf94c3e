"""The C++ CPU kernel of the score kernel's surrogate gradient (bspf_ext::score_kernel_grad,
csrc/cpu/score_kernel_grad.cpp, docs/spec.md §4a) against the reference's linear-space
autograd: float64 to 1e-10, float32 to the float64 surrogate with the kernel's own choices,
the same bits on any thread count, and its errors."""

import pytest
import torch

from bspf_ext import _C, reference
from bspf_ext.ops import params as _params
from bspf_ext.ops.library import allocate_forward, forward_op, score_kernel_grad_op
from support import kernel_choices, random_inputs

CASES = [  # b, h, n, block_size, keep_ratio, fuse
    (2, 2, 37, 8, 0.5, True),  # N not a multiple of Ω: a ragged last chunk
    (1, 3, 45, 4, 0.3, True),
    (2, 1, 45, 4, 0.3, False),
    (1, 2, 70, 16, 0.5, True),
    (1, 2, 70, 16, 0.5, False),
    (2, 2, 53, 16, 0.8, True),  # 16×5 tail blocks
    (3, 5, 24, 8, 0.25, True),  # 15 pairs: more than the threads
    (1, 2, 33, 8, 1 / 64, True),  # k = 1 in full blocks
    (1, 2, 33, 8, 63 / 64, True),  # k = |block| − 1 in full blocks
]


def _kernel(seed=0, dtype=torch.float64):
    w = torch.softmax(torch.randn(9, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), 0)
    w = w.reshape(3, 3)
    return ((w + w.T) / 2).to(dtype)


def _op_gradient(qk, v, w, grad, block_size, keep_ratio, fuse, scale=None):
    scale = qk.shape[-1] ** -0.5 if scale is None else scale
    _, *saved = forward_op(qk, v, w, block_size, keep_ratio, fuse, scale)
    return score_kernel_grad_op(grad, qk, v, w, *saved, block_size, keep_ratio, fuse, scale)


def _reference_gradient(qk, v, w, grad, block_size, keep_ratio, fuse, mask=None, match=None):
    w = w.detach().clone().requires_grad_()
    out = reference.block_symmetric_attention(qk, v, w, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse,
                                              mask=mask, match=match, score_kernel_grad="surrogate")
    (grad_w,) = torch.autograd.grad(out, w, grad)
    return grad_w


@pytest.mark.parametrize("b,h,n,block_size,keep_ratio,fuse", CASES)
def test_float64_matches_the_reference(b, h, n, block_size, keep_ratio, fuse):
    qk, v = random_inputs(b, h, n, 8, 6, seed=n)
    grad = torch.randn(b, h, n, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = _op_gradient(qk, v, _kernel(), grad, block_size, keep_ratio, fuse)
    expected = _reference_gradient(qk, v, _kernel(), grad, block_size, keep_ratio, fuse)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("b,h,n,block_size,keep_ratio,fuse", CASES)
def test_float32_matches_the_float64_surrogate(b, h, n, block_size, keep_ratio, fuse):
    qk, v = random_inputs(b, h, n, 8, 6, dtype=torch.float32, seed=n)
    grad = torch.randn(b, h, n, 6, generator=torch.Generator().manual_seed(1))
    w = _kernel(dtype=torch.float32)
    got = _op_gradient(qk, v, w, grad, block_size, keep_ratio, fuse)
    assert got.dtype == torch.float32
    # The float64 surrogate with the kernel's own mask and matches (SPEC §6 near-ties).
    _, mask, match = kernel_choices(qk, v, w, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse)
    expected = _reference_gradient(qk.double(), v.double(), w.double(), grad.double(), block_size, keep_ratio, fuse,
                                   mask=mask, match=match)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_ties_in_the_scores():
    # Repeated tokens give blocks of equal scores: τ sits on a tie (s_k = s_(k+1)). Which of
    # the tied entries are kept and matched depends on roundings, so the reference takes
    # the kernel's choices.
    qk, v = random_inputs(1, 2, 40, 4, 3, seed=7)
    qk = qk[:, :, torch.arange(40) % 4].contiguous()
    ranked = reference.block_scores(qk, block_size=8)[0, 0, :8, 8:16].flatten().sort(descending=True).values
    assert ranked[31] == ranked[32]  # k = 32 of 64: the threshold is a tie
    grad = torch.randn(1, 2, 40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    box = reference.box_score_kernel(torch.float64)
    got = _op_gradient(qk, v, box, grad, 8, 0.5, True)
    _, mask, match = kernel_choices(qk, v, box, block_size=8, keep_ratio=0.5)
    expected = _reference_gradient(qk, v, box, grad, 8, 0.5, True, mask=mask, match=match)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,block_size,keep_ratio", [(33, 1, 0.5), (30, 6, 0.0), (30, 6, 1.0), (5, 8, 0.5)])
def test_no_choice_gives_zeros(n, block_size, keep_ratio):
    # One-token blocks, k = 0, k = |block| and a single chunk: nothing is relaxed.
    qk, v = random_inputs(1, 2, n, 4, 3)
    grad = torch.randn(1, 2, n, 3, dtype=torch.float64)
    got = _op_gradient(qk, v, _kernel(), grad, block_size, keep_ratio, True)
    assert torch.equal(got, torch.zeros(3, 3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_same_bits_on_any_thread_count(dtype):
    qk, v = random_inputs(3, 5, 41, 8, 6, dtype=dtype, seed=4)
    grad = torch.randn(3, 5, 41, 6, dtype=dtype, generator=torch.Generator().manual_seed(3))
    w = _kernel(dtype=dtype)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 7):
            torch.set_num_threads(threads)
            results.append(_op_gradient(qk, v, w, grad, 8, 0.4, True))
    finally:
        torch.set_num_threads(before)
    assert results[0].abs().sum() > 0
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_strided_inputs_give_the_contiguous_result():
    qk, v = random_inputs(2, 3, 30, 8, 6, seed=5)
    grad = torch.randn(2, 3, 30, 6, dtype=torch.float64)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (qk, v, grad)]
    expected = _op_gradient(qk, v, _kernel(), grad, 8, 0.5, True)
    assert torch.equal(_op_gradient(*strided[:2], _kernel(), strided[2], 8, 0.5, True), expected)


def test_empty_problems_give_zeros():
    qk, v = random_inputs(0, 2, 10, 4, 3)
    grad = torch.randn(0, 2, 10, 3, dtype=torch.float64)
    assert torch.equal(_op_gradient(qk, v, _kernel(), grad, 4, 0.5, True), torch.zeros(3, 3, dtype=torch.float64))


def test_opcheck():
    qk, v = random_inputs(1, 2, 20, 4, 3)
    w = _kernel()
    _, *saved = forward_op(qk, v, w, 8, 0.5, True, 0.5)
    grad = torch.randn(1, 2, 20, 3, dtype=torch.float64)
    torch.library.opcheck(score_kernel_grad_op, (grad, qk, v, w, *saved, 8, 0.5, True, 0.5))


# ----------------------------------------------------------------------- bad input


def _valid_params(keep_ratio=0.5):
    """C++ params over valid buffers; the tensors are returned so they outlive the params."""
    qk, v = random_inputs(1, 2, 20, 4, 3, dtype=torch.float32)
    outputs = allocate_forward(qk, v, 8)
    kernel = _params.score_kernel_buffer(reference.box_score_kernel(torch.float32), torch.float32)
    grad = torch.empty(3, 3)
    params = _params.score_kernel_grad_params(_C, torch.ones_like(v), qk, v, kernel, _params.saved(_C, *outputs[1:]),
                                              8, keep_ratio, True, 0.5, grad, 1)
    return params, (qk, v, outputs, kernel, grad)


def test_the_core_names_a_null_pointer():
    params, _keep = _valid_params()
    params.grad_score_kernel = 0
    with pytest.raises(ValueError, match="grad_score_kernel is null"):
        _C.score_kernel_grad(params)
    params, _keep = _valid_params()
    saved = params.saved
    saved.lse = 0
    params.saved = saved
    with pytest.raises(ValueError, match="saved.lse is null"):
        _C.score_kernel_grad(params)


def test_the_core_names_a_bad_keep_ratio_and_block_size():
    params, _keep = _valid_params(keep_ratio=1.5)
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        _C.score_kernel_grad(params)
    params, _keep = _valid_params()
    p = params.p
    p.block_size = 65
    params.p = p
    with pytest.raises(ValueError, match="p.block_size must be in"):
        _C.score_kernel_grad(params)


def test_the_cpu_kernels_refuse_half_precision():
    params, _keep = _valid_params()
    p = params.p
    p.dtype = _C.DType.float16
    params.p = p
    with pytest.raises(ValueError, match="float32 and float64 only"):
        _C.score_kernel_grad(params)


def test_the_op_names_a_bad_score_kernel():
    qk, v = random_inputs(1, 2, 20, 4, 3)
    _, *saved = forward_op(qk, v, _kernel(), 8, 0.5, True, 0.5)
    grad = torch.randn(1, 2, 20, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="score_kernel must have shape"):
        score_kernel_grad_op(grad, qk, v, torch.ones(9, dtype=torch.float64), *saved, 8, 0.5, True, 0.5)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        score_kernel_grad_op(grad[..., :2], qk, v, _kernel(), *saved, 8, 0.5, True, 0.5)
