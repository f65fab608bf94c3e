"""The CUDA kernel of the score kernel's surrogate gradient (csrc/cuda/score_kernel_grad.cu,
docs/spec.md §4a), compiled for the CPU by tools/cuda_emulation, against the float64
reference with the kernel's own choices: every dtype at the backward's tolerances, zeros
where no block has a choice, the same bits on every run, and its errors. The same kernel
runs on a GPU in tests/test_score_kernel_grad_cuda.py."""

import pytest
import torch

from bspf_ext import reference
from bspf_ext.ops import params as _params
from cuda_emulation import ops
from cuda_emulation.module import emulated_cuda  # noqa: F401  (fixture)
from support import GRAD_RTOL, random_inputs

pytestmark = pytest.mark.cuda_emulated

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]
CASES = [  # b, h, n, block_size, keep_ratio, fuse
    (1, 2, 37, 8, 0.5, True),  # a ragged last chunk
    (2, 1, 30, 4, 0.3, False),
    (1, 1, 40, 16, 0.6, True),  # 16×8 tail blocks
]


def _kernel(dtype):
    w = torch.softmax(torch.randn(9, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 0)
    w = w.reshape(3, 3)
    return ((w + w.T) / 2).to(dtype)


def _run(cuda, qk, v, grad, w, block_size, keep_ratio, fuse):
    fwd = ops.forward(cuda, qk, v, w, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse)
    got = ops.score_kernel_grad(cuda, grad, qk, v, w, fwd, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse)
    return fwd, got


def _reference(qk, v, grad, w, fwd, block_size, keep_ratio, fuse):
    """The float64 surrogate on the same rounded inputs, with the kernel's mask and matches."""
    mask = ops.forward_mask(fwd, qk.shape[-2], block_size)
    kernel = w.double().requires_grad_()
    out = reference.block_symmetric_attention(qk.double(), v.double(), kernel, block_size=block_size,
                                              keep_ratio=keep_ratio, fuse=fuse, mask=mask, match=fwd.match.long(),
                                              score_kernel_grad="surrogate")
    (expected,) = torch.autograd.grad(out, kernel, grad.double())
    return expected


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("b,h,n,block_size,keep_ratio,fuse", CASES)
def test_matches_the_reference(emulated_cuda, dtype, b, h, n, block_size, keep_ratio, fuse):
    qk, v = random_inputs(b, h, n, 8, 6, dtype=dtype, seed=n)
    grad = torch.randn(b, h, n, 6, generator=torch.Generator().manual_seed(1)).to(dtype)
    w = _kernel(dtype)
    fwd, got = _run(emulated_cuda, qk, v, grad, w, block_size, keep_ratio, fuse)
    expected = _reference(qk, v, grad, w, fwd, block_size, keep_ratio, fuse)
    assert expected.abs().sum() > 0
    rtol = GRAD_RTOL[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def test_float64_agrees_with_the_cpu_kernel_and_repeats_bitwise(emulated_cuda):
    qk, v = random_inputs(2, 2, 29, 8, 5, seed=3)
    grad = torch.randn(2, 2, 29, 5, dtype=torch.float64)
    w = _kernel(torch.float64)
    fwd, first = _run(emulated_cuda, qk, v, grad, w, 8, 0.4, True)
    again = ops.score_kernel_grad(emulated_cuda, grad, qk, v, w, fwd, block_size=8, keep_ratio=0.4)
    assert torch.equal(first, again)
    cpu = torch.ops.bspf_ext.score_kernel_grad(grad, qk, v, w, *fwd[1:], 8, 0.4, True, 8**-0.5)
    torch.testing.assert_close(first, cpu, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n,block_size,keep_ratio", [(9, 1, 0.5), (20, 6, 0.0), (20, 6, 1.0), (5, 8, 0.5)])
def test_no_choice_gives_zeros(emulated_cuda, n, block_size, keep_ratio):
    qk, v = random_inputs(1, 2, n, 4, 3, dtype=torch.float32)
    grad = torch.randn(1, 2, n, 3)
    _, got = _run(emulated_cuda, qk, v, grad, _kernel(torch.float32), block_size, keep_ratio, True)
    assert torch.equal(got, torch.zeros(3, 3))  # the output starts as NaN: zeros are written


def test_empty_problem_gives_zeros(emulated_cuda):
    qk, v = random_inputs(0, 2, 10, 4, 3, dtype=torch.float32)
    w = _kernel(torch.float32)
    # Saved buffers of B = 0 are empty; those of a real run stand in (nothing is read).
    fwd = ops.forward(emulated_cuda, *random_inputs(1, 2, 10, 4, 3, dtype=torch.float32), w, block_size=4,
                      keep_ratio=0.5)
    got = ops.score_kernel_grad(emulated_cuda, torch.zeros(0, 2, 10, 3), qk, v, w, fwd, block_size=4, keep_ratio=0.5)
    assert torch.equal(got, torch.zeros(3, 3))


def test_null_partials_is_a_clear_error(emulated_cuda):
    qk, v = random_inputs(1, 1, 12, 4, 3, dtype=torch.float32)
    w = _kernel(torch.float32)
    fwd = ops.forward(emulated_cuda, qk, v, w, block_size=4, keep_ratio=0.5)
    grad = torch.empty(3, 3)
    params = _params.score_kernel_grad_params(emulated_cuda, torch.ones_like(v), qk, v, w,
                                              _params.saved(emulated_cuda, *fwd[1:]), 4, 0.5, True, 0.5, grad, 0)
    with pytest.raises(ValueError, match="partials is null"):
        emulated_cuda.score_kernel_grad(params, 0, ops.DEVICE, ops.STREAM)
    params.grad_score_kernel = 0
    with pytest.raises(ValueError, match="grad_score_kernel is null"):
        emulated_cuda.score_kernel_grad(params, 1, ops.DEVICE, ops.STREAM)
