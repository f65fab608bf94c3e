"""SPEC §6, extreme logits: logits up to ±1e5 and token norms 10⁴ apart. The reference and
every CPU path (portable, AVX2) give finite output and gradients wherever dense SDPA is
finite; float64 equals SPEC §3 evaluated in 50-digit arithmetic to 1e-9.

The hard case is a row whose kept entries all underflow after the full-row softmax shift
(its mass sits on pruned entries): P ⊙ M is 0 there in floating point, so R / Z would be
0 / 0. The inputs below are built to contain such rows, and the tests check that they do.

Below float64 the problem itself is ill-conditioned at such logits: float32 rounds a logit
of 1e5 by up to 4e-3, which moves exp(L − lse) by as much, in any implementation (SDPA's
too). Float32 results are compared at that conditioning, the float32 spacing (eps) of the
largest |logit|, never below SPEC §6's 1e-5. The CUDA kernels are tested the same way in
tests/test_cuda_emulated_extreme.py (emulated on the CPU) and tests/test_extreme_logits_cuda.py
(on a GPU).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import bspf_ext
from bspf_ext import reference
from naive import naive_bspf
from support import GRAD_RTOL, OUTPUT_RTOL, kernel_choices, random_inputs
from test_cpu_simd import needs_avx2, needs_avx512

LOGITS = [1e2, 1e4, 1e5]


def extreme_inputs(b, h, n, d, *, max_logit, seed=0, dtype=torch.float64):
    """qk scaled so that the largest |logit| is max_logit, with every fifth token 10⁴ times
    shorter than the rest (its row's logits are then small, its column's large)."""
    qk, v = random_inputs(b, h, n, d, seed=seed)
    logits = d**-0.5 * (qk @ qk.transpose(-1, -2))
    qk = qk * math.sqrt(max_logit / logits.abs().max().item())
    qk[..., ::5, :] *= 1e-4
    return qk.to(dtype), v.to(dtype)


def underflowing_rows(qk, mask) -> int:
    """Rows whose kept softmax probabilities are all 0 in qk's dtype (the hard case)."""
    probs = torch.softmax(qk.shape[-1] ** -0.5 * (qk @ qk.transpose(-1, -2)), dim=-1)
    return int(((probs * mask).sum(-1) == 0).sum())


def conditioned_rtol(qk) -> float:
    """OUTPUT_RTOL of qk's dtype, or eps · the largest |logit| (one rounding of it) when larger."""
    largest = (qk.shape[-1] ** -0.5 * (qk.double() @ qk.double().transpose(-1, -2))).abs().max().item()
    return max(OUTPUT_RTOL[qk.dtype], torch.finfo(qk.dtype).eps * largest)


@pytest.mark.parametrize("max_logit", LOGITS)
@pytest.mark.parametrize("fuse", [True, False])
def test_reference_equals_spec_in_exact_arithmetic(max_logit, fuse):
    qk, v = extreme_inputs(1, 1, 13, 3, max_logit=max_logit, seed=1)
    w = reference.box_score_kernel(torch.float64)
    expected, mask, _ = naive_bspf(qk[0, 0], v[0, 0], w, 4, 0.5, fuse, exact=True)
    if max_logit == LOGITS[-1]:
        assert underflowing_rows(qk, mask) > 0, "the inputs lack the hard case"
    got = reference.block_symmetric_attention(qk, v, block_size=4, keep_ratio=0.5, fuse=fuse)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0, 0], expected, rtol=1e-9, atol=1e-9)


def _paths():
    return [
        pytest.param("scalar", torch.float64, id="scalar-float64"),
        pytest.param("scalar", torch.float32, id="scalar-float32"),
        pytest.param("avx2", torch.float32, id="avx2-float32", marks=needs_avx2),
        pytest.param("avx512", torch.float32, id="avx512-float32", marks=needs_avx512),
    ]


@pytest.mark.parametrize("path,dtype", _paths())
@pytest.mark.parametrize("max_logit", LOGITS)
@pytest.mark.parametrize("fuse", [True, False])
def test_cpu_paths_finite_and_equal_to_reference(monkeypatch, path, dtype, max_logit, fuse):
    monkeypatch.setenv("BSPF_CPU_CAPABILITY", path)
    qk, v = extreme_inputs(2, 2, 70, 8, max_logit=max_logit, dtype=dtype)
    assert torch.isfinite(F.scaled_dot_product_attention(qk, qk, v)).all()
    out, mask, match = kernel_choices(qk, v, None, block_size=16, keep_ratio=0.5, fuse=fuse)
    if max_logit == LOGITS[-1]:
        assert underflowing_rows(qk, mask) > 0, "the inputs lack the hard case"
    assert torch.isfinite(out).all()
    # The kernel's own choices (SPEC §6 near-ties), on the same rounded inputs in float64.
    expected = reference.block_symmetric_attention(qk.double(), v.double(), block_size=16, keep_ratio=0.5, fuse=fuse,
                                                   mask=mask, match=match)
    rtol = conditioned_rtol(qk)
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("path,dtype", _paths())
@pytest.mark.parametrize("max_logit", LOGITS)
def test_cpu_gradients_finite_and_equal_to_reference(monkeypatch, path, dtype, max_logit):
    monkeypatch.setenv("BSPF_CPU_CAPABILITY", path)
    qk, v = extreme_inputs(1, 2, 50, 8, max_logit=max_logit, seed=2, dtype=dtype)
    grad = torch.randn(1, 2, 50, 8, dtype=torch.float64).to(dtype)
    _, mask, match = kernel_choices(qk, v, None, block_size=16, keep_ratio=0.5)
    a, b = qk.clone().requires_grad_(), v.clone().requires_grad_()
    got = torch.autograd.grad(bspf_ext.block_symmetric_attention(a, b, block_size=16), (a, b), grad)
    a64, b64 = qk.double().requires_grad_(), v.double().requires_grad_()
    out64 = reference.block_symmetric_attention(a64, b64, block_size=16, mask=mask, match=match)
    expected = torch.autograd.grad(out64, (a64, b64), grad.double())
    rtol = max(GRAD_RTOL[dtype], conditioned_rtol(qk))
    for name, g, e in zip(("grad_qk", "grad_v"), got, expected):
        assert torch.isfinite(g).all(), name
        scale = max(e.abs().max().item(), 1.0)
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "vector_path", [pytest.param("avx2", marks=needs_avx2), pytest.param("avx512", marks=needs_avx512)]
)
def test_vector_paths_hand_extreme_pairs_to_the_portable_path(monkeypatch, vector_path):
    # Head 0 holds the hard case, head 1 ordinary logits: the vector path computes head 1
    # itself and hands head 0 to the portable path, whose result it then is, bit for bit.
    hard, _ = extreme_inputs(1, 1, 70, 8, max_logit=1e5, dtype=torch.float32)
    easy, v = random_inputs(1, 2, 70, 8, dtype=torch.float32, seed=3)
    qk = torch.cat([hard, easy[:, 1:]], dim=1)
    results = {}
    for path in ("scalar", vector_path):
        monkeypatch.setenv("BSPF_CPU_CAPABILITY", path)
        a = qk.clone().requires_grad_()
        out = bspf_ext.block_symmetric_attention(a, v, block_size=16)
        out.backward(torch.ones_like(out))
        results[path] = (out.detach(), a.grad)
    for got, expected in zip(results[vector_path], results["scalar"]):
        assert torch.equal(got[:, 0], expected[:, 0])
        assert torch.isfinite(got).all()
