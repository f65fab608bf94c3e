"""SPEC §6, extreme logits, on a GPU through the public op: the CUDA forward and backward
are finite and equal to the float64 reference (with the kernel's own choices) at logits up
to 1e5, every dtype. The same comparisons as tests/test_cuda_emulated_extreme.py, which runs
these kernels' sources on the CPU; this file is where the real hardware (its exp/log, FTZ
behaviour and tensor cores) is checked. Marked `cuda` and skipped without a GPU."""

import pytest
import torch

import bspf_ext
from bspf_ext import reference
from bspf_ext.ops import backends as _backends
from support import GRAD_RTOL, OUTPUT_RTOL, kernel_choices
from test_cuda_emulated_extreme import accumulation, conditioned
from test_extreme_logits import LOGITS, extreme_inputs, underflowing_rows

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.skipif(not _backends.has_cuda_build(), reason="bspf_ext was built without CUDA"),
]

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("max_logit", LOGITS)
@pytest.mark.parametrize("fuse", [True, False])
def test_forward_finite_and_equal_to_reference(dtype, max_logit, fuse):
    qk, v = extreme_inputs(2, 2, 70, 8, max_logit=max_logit, dtype=dtype)
    out, mask, match = kernel_choices(qk.cuda(), v.cuda(), None, block_size=16, keep_ratio=0.5, fuse=fuse)
    mask, match = mask.cpu(), match.cpu()
    if max_logit == LOGITS[-1]:
        assert underflowing_rows(qk.to(accumulation(dtype)), mask) > 0, "the inputs lack the hard case"
    assert torch.isfinite(out).all()
    expected = reference.block_symmetric_attention(qk.double(), v.double(), block_size=16, keep_ratio=0.5, fuse=fuse,
                                                   mask=mask, match=match)
    rtol = conditioned(qk, OUTPUT_RTOL)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("max_logit", LOGITS)
def test_gradients_finite_and_equal_to_reference(dtype, max_logit):
    qk, v = extreme_inputs(1, 2, 50, 8, max_logit=max_logit, seed=2, dtype=dtype)
    grad = torch.randn(1, 2, 50, 8, dtype=torch.float64).to(dtype)
    _, mask, match = kernel_choices(qk.cuda(), v.cuda(), None, block_size=16, keep_ratio=0.5)
    a, b = qk.cuda().requires_grad_(), v.cuda().requires_grad_()
    got = torch.autograd.grad(bspf_ext.block_symmetric_attention(a, b, block_size=16), (a, b), grad.cuda())
    a64, b64 = qk.double().requires_grad_(), v.double().requires_grad_()
    out64 = reference.block_symmetric_attention(a64, b64, block_size=16, mask=mask.cpu(), match=match.cpu())
    expected = torch.autograd.grad(out64, (a64, b64), grad.double())
    rtol = conditioned(qk, GRAD_RTOL)
    for name, g, e in zip(("grad_qk", "grad_v"), got, expected):
        assert torch.isfinite(g).all(), name
        scale = max(e.abs().max().item(), 1.0)
        torch.testing.assert_close(g.cpu().double(), e, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")
