"""The CUDA kernel of the score kernel's surrogate gradient (docs/spec.md §4a) on a GPU,
through the public op: float64 equal to the CPU kernel's to 1e-10, float32 and half
precision to the float64 reference with the kernel's own choices, the same bits on every
run. Marked `cuda` and skipped without a GPU; tests/test_cuda_emulated_score_kernel_grad.py
runs the same kernel on the CPU."""

import pytest
import torch

import bspf_ext
from bspf_ext import reference
from bspf_ext.ops import backends
from support import GRAD_RTOL, kernel_choices, random_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.skipif(not backends.has_cuda_build(), reason="bspf_ext was built without CUDA"),
]

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _kernel(dtype, device):
    w = torch.softmax(torch.randn(9, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 0)
    w = w.reshape(3, 3)
    return ((w + w.T) / 2).to(dtype=dtype, device=device)


def _grad_kernel(qk, v, w, grad, **kwargs):
    w = w.detach().clone().requires_grad_()
    out = bspf_ext.block_symmetric_attention(qk, v, w, score_kernel_grad="surrogate", **kwargs)
    return torch.autograd.grad(out, w, grad)[0]


@pytest.mark.parametrize("n,block_size,keep_ratio,fuse", [(197, 16, 0.5, True), (101, 8, 0.3, False),
                                                           (65, 4, 0.7, True)])
def test_float64_equals_the_cpu_kernel(n, block_size, keep_ratio, fuse):
    qk, v = random_inputs(4, 3, n, 16, 8, seed=n)
    grad = torch.randn(4, 3, n, 8, dtype=torch.float64)
    kwargs = dict(block_size=block_size, keep_ratio=keep_ratio, fuse=fuse)
    cpu = _grad_kernel(qk, v, _kernel(torch.float64, "cpu"), grad, **kwargs)
    gpu = _grad_kernel(qk.cuda(), v.cuda(), _kernel(torch.float64, "cuda"), grad.cuda(), **kwargs)
    assert cpu.abs().sum() > 0
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=["float32", "float16", "bfloat16"])
def test_lower_precision_matches_the_reference(dtype):
    qk, v = random_inputs(2, 3, 197, 16, 8, dtype=dtype, device="cuda", seed=1)
    grad = torch.randn(2, 3, 197, 8, device="cuda").to(dtype)
    w = _kernel(dtype, "cuda")
    got = _grad_kernel(qk, v, w, grad, block_size=16, keep_ratio=0.5)
    _, mask, match = kernel_choices(qk, v, w, block_size=16, keep_ratio=0.5)
    kernel = w.double().requires_grad_()
    out = reference.block_symmetric_attention(qk.double(), v.double(), kernel, block_size=16, keep_ratio=0.5,
                                              mask=mask, match=match, score_kernel_grad="surrogate")
    (expected,) = torch.autograd.grad(out, kernel, grad.double())
    rtol = GRAD_RTOL[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def test_the_same_bits_on_every_run():
    qk, v = random_inputs(8, 6, 197, 64, 64, dtype=torch.float32, device="cuda", seed=2)
    grad = torch.randn_like(v)
    w = _kernel(torch.float32, "cuda")
    first = _grad_kernel(qk, v, w, grad, block_size=16, keep_ratio=0.5)
    for _ in range(3):
        assert torch.equal(_grad_kernel(qk, v, w, grad, block_size=16, keep_ratio=0.5), first)
