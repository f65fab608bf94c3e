"""SPEC §6, extreme logits, on the real CUDA kernels (csrc/cuda, run on the CPU by
tools/cuda_emulation): logits up to ±1e5 and token norms 10⁴ apart, every dtype. The output,
every saved statistic and the gradients are finite, and equal the float64 reference (computed
with the kernel's own mask and matches on the same rounded inputs): float64 to 1e-10 (SPEC
§6 asks 1e-9), below float64 at the problem's conditioning, as tests/test_extreme_logits.py does for
the CPU paths. The CUDA kernels accumulate fp16/bf16 in float32, so their conditioning is
float32's spacing of the largest logit.

The inputs contain the hard case (rows whose kept softmax probabilities all underflow), so
the forward's log-space fallback and the backward's log-space weights run; ordinary rows
next to them take the linear form.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bspf_ext import reference
from cuda_emulation import ops
from cuda_emulation.checks import assert_mask_words_well_formed, reference_gradients
from cuda_emulation.module import emulated_cuda  # noqa: F401  (fixture)
from support import GRAD_RTOL, OUTPUT_RTOL, random_inputs
from test_extreme_logits import LOGITS, extreme_inputs, underflowing_rows

pytestmark = pytest.mark.cuda_emulated

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]
BLOCK = 16


def accumulation(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def largest_logit(qk) -> float:
    q = qk.double()
    return (q.shape[-1] ** -0.5 * (q @ q.transpose(-1, -2))).abs().max().item()


def conditioned(qk, tolerances) -> float:
    """The dtype's tolerance, or one rounding of the largest logit in the accumulation type
    when that is larger (SPEC §6: a rounding of L moves exp(L − lse) by eps·|L|). For float64
    at logits of 1e5 that is 1e-10, inside SPEC §6's 1e-9."""
    return max(tolerances[qk.dtype], torch.finfo(accumulation(qk.dtype)).eps * largest_logit(qk))


def log_row_sums(qk64, mask, match, *, fuse):
    """log Z of SPEC §3 in float64, evaluated in log space (finite where Z underflows)."""
    logits = qk64.shape[-1] ** -0.5 * (qk64 @ qk64.transpose(-1, -2))
    log_p = logits - torch.logsumexp(logits, -1, keepdim=True)
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64)
    terms = [torch.where(mask, log_p, neg_inf)]
    if fuse:
        match, rho = reference._match_and_rho(qk64, BLOCK, match)
        similarity = reference._pattern_similarity(mask, match, BLOCK).to(torch.float64)
        target_kept = mask.gather(-2, match[..., None].expand_as(mask))
        moves = ~mask & target_kept & (rho[..., None] > 0)
        share = torch.where(moves, log_p + torch.log(rho[..., None] * similarity), neg_inf)
        n = qk64.shape[-2]
        # into[..., p, i, j]: row i's share of column j when it moves to p = b(i).
        to_p = match[..., None, :] == torch.arange(n)[:, None]
        into = torch.where(to_p[..., None], share[..., None, :, :], neg_inf)
        terms.append(torch.logsumexp(into, -2))
    return torch.logsumexp(torch.stack(terms).logsumexp(0), -1)


def _close(got, expected, rtol, what):
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("max_logit", LOGITS)
@pytest.mark.parametrize("fuse", [True, False])
def test_forward_finite_and_equal_to_reference(emulated_cuda, dtype, max_logit, fuse):
    qk, v = extreme_inputs(2, 2, 70, 8, max_logit=max_logit, dtype=dtype)
    assert torch.isfinite(F.scaled_dot_product_attention(qk.double(), qk.double(), v.double())).all()
    fwd = ops.forward(emulated_cuda, qk, v, block_size=BLOCK, keep_ratio=0.5, fuse=fuse)
    assert_mask_words_well_formed(fwd.mask_words, 70, BLOCK, 0.5)
    mask, match = ops.forward_mask(fwd, 70, BLOCK), fwd.match.long()
    if max_logit == LOGITS[-1]:
        assert underflowing_rows(qk.to(accumulation(dtype)), mask) > 0, "the inputs lack the hard case"
    for name, value in zip(fwd._fields, fwd):
        if value.dtype.is_floating_point:
            assert torch.isfinite(value).all(), name
    qk64 = qk.double()
    expected = reference.block_symmetric_attention(qk64, v.double(), block_size=BLOCK, keep_ratio=0.5, fuse=fuse,
                                                   mask=mask, match=match)
    rtol = conditioned(qk, OUTPUT_RTOL)
    torch.testing.assert_close(fwd.out.double(), expected, rtol=rtol, atol=rtol)
    logits = qk64.shape[-1] ** -0.5 * (qk64 @ qk64.transpose(-1, -2))
    stat_rtol = max(rtol, conditioned(qk.to(accumulation(dtype)), OUTPUT_RTOL))
    _close(fwd.lse, torch.logsumexp(logits, -1), stat_rtol, "lse")
    _close(fwd.log_row_sum, log_row_sums(qk64, mask, match, fuse=fuse), stat_rtol, "log_row_sum")


def test_float64_forward_equals_the_plain_reference(emulated_cuda):
    # Float64 makes the reference's own choices (no near-ties at these inputs): SPEC §6's
    # 1e-9 against the reference itself, which tests/test_extreme_logits.py holds to 50-digit §3.
    qk, v = extreme_inputs(1, 2, 70, 8, max_logit=1e5, seed=4)
    fwd = ops.forward(emulated_cuda, qk, v, block_size=BLOCK, keep_ratio=0.5)
    assert torch.equal(ops.forward_mask(fwd, 70, BLOCK), reference.block_mask(qk, block_size=BLOCK, keep_ratio=0.5))
    expected = reference.block_symmetric_attention(qk, v, block_size=BLOCK, keep_ratio=0.5)
    torch.testing.assert_close(fwd.out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("max_logit", LOGITS)
@pytest.mark.parametrize("fuse", [True, False])
def test_gradients_finite_and_equal_to_reference(emulated_cuda, dtype, max_logit, fuse):
    qk, v = extreme_inputs(1, 2, 50, 8, max_logit=max_logit, seed=2, dtype=dtype)
    grad = torch.randn(1, 2, 50, 8, dtype=torch.float64).to(dtype)
    fwd = ops.forward(emulated_cuda, qk, v, block_size=BLOCK, keep_ratio=0.5, fuse=fuse)
    mask, match = ops.forward_mask(fwd, 50, BLOCK), fwd.match.long()
    if max_logit == LOGITS[-1]:
        assert underflowing_rows(qk.to(accumulation(dtype)), mask) > 0, "the inputs lack the hard case"
    got = ops.backward(emulated_cuda, grad, qk, v, fwd, block_size=BLOCK, fuse=fuse)
    expected = reference_gradients(qk, v, grad, mask, match, block_size=BLOCK, fuse=fuse)
    rtol = conditioned(qk, GRAD_RTOL)
    for name, g, e in zip(("grad_qk", "grad_v"), got, expected):
        assert torch.isfinite(g).all(), name
        _close(g, e, rtol, name)


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
@pytest.mark.parametrize("block_size,keep_ratio", [(1, 0.5), (2, 0.3), (7, 0.5), (64, 0.3)])
def test_forward_and_gradients_other_blocks(emulated_cuda, dtype, block_size, keep_ratio):
    # Chunks of one token (no fusion), two (a moved entry whose pattern similarity H is 0,
    # both bits of its chunk differing, is common: it moves nothing, although P/Z of its
    # target row overflows at these logits), ragged ones and a whole strip.
    qk, v = extreme_inputs(1, 2, 130, 8, max_logit=1e5, seed=1, dtype=dtype)
    grad = torch.randn(1, 2, 130, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    fwd = ops.forward(emulated_cuda, qk, v, block_size=block_size, keep_ratio=keep_ratio)
    mask, match = ops.forward_mask(fwd, 130, block_size), fwd.match.long()
    expected = reference.block_symmetric_attention(qk.double(), v.double(), block_size=block_size,
                                                   keep_ratio=keep_ratio, mask=mask, match=match)
    rtol = conditioned(qk, OUTPUT_RTOL)
    assert torch.isfinite(fwd.out).all()
    torch.testing.assert_close(fwd.out.double(), expected, rtol=rtol, atol=rtol)
    got = ops.backward(emulated_cuda, grad, qk, v, fwd, block_size=block_size)
    expected = reference_gradients(qk, v, grad, mask, match, block_size=block_size, fuse=True)
    rtol = conditioned(qk, GRAD_RTOL)
    for name, g, e in zip(("grad_qk", "grad_v"), got, expected):
        assert torch.isfinite(g).all(), name
        _close(g, e, rtol, name)


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_negative_scale(emulated_cuda, dtype):
    # Logits down to −1e5: each long token's own logit is its row's smallest.
    qk, v = extreme_inputs(1, 2, 70, 8, max_logit=1e5, seed=5, dtype=dtype)
    scale = -(8**-0.5)
    grad = torch.randn(1, 2, 70, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(dtype)
    fwd = ops.forward(emulated_cuda, qk, v, block_size=BLOCK, keep_ratio=0.5, scale=scale)
    mask, match = ops.forward_mask(fwd, 70, BLOCK), fwd.match.long()
    expected = reference.block_symmetric_attention(qk.double(), v.double(), block_size=BLOCK, keep_ratio=0.5,
                                                   scale=scale, mask=mask, match=match)
    rtol = conditioned(qk, OUTPUT_RTOL)
    assert torch.isfinite(fwd.out).all()
    torch.testing.assert_close(fwd.out.double(), expected, rtol=rtol, atol=rtol)
    got = ops.backward(emulated_cuda, grad, qk, v, fwd, block_size=BLOCK, scale=scale)
    expected = reference_gradients(qk, v, grad, mask, match, block_size=BLOCK, fuse=True, scale=scale)
    rtol = conditioned(qk, GRAD_RTOL)
    for name, g, e in zip(("grad_qk", "grad_v"), got, expected):
        assert torch.isfinite(g).all(), name
        _close(g, e, rtol, name)


def test_ordinary_heads_are_unaffected_by_an_extreme_one(emulated_cuda):
    # Head 0 holds the hard case (its strips take the log-space fallback), head 1 ordinary
    # logits: head 1's outputs and gradients are bitwise those of head 1 run alone.
    hard, _ = extreme_inputs(1, 1, 70, 8, max_logit=1e5, dtype=torch.float32)
    easy, v = random_inputs(1, 2, 70, 8, dtype=torch.float32, seed=3)
    qk = torch.cat([hard, easy[:, 1:]], dim=1)
    grad = torch.randn(1, 2, 70, 8, dtype=torch.float32)
    both = ops.forward(emulated_cuda, qk, v, block_size=BLOCK, keep_ratio=0.5)
    alone = ops.forward(emulated_cuda, qk[:, 1:].contiguous(), v[:, 1:].contiguous(), block_size=BLOCK,
                        keep_ratio=0.5)
    for name, a, b in zip(both._fields, both, alone):
        assert torch.equal(a[:, 1:], b), name
    grads_both = ops.backward(emulated_cuda, grad, qk, v, both, block_size=BLOCK)
    grads_alone = ops.backward(emulated_cuda, grad[:, 1:].contiguous(), qk[:, 1:].contiguous(),
                               v[:, 1:].contiguous(), alone, block_size=BLOCK)
    for a, b in zip(grads_both, grads_alone):
        assert torch.equal(a[:, 1:], b)
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_nan_input_is_not_turned_into_numbers(emulated_cuda, dtype):
    # The log-space forms cap log P at 0; the cap keeps a NaN (as the CPU paths do), so a
    # head with a NaN input gives NaN, never finite garbage, and the other head is unaffected.
    qk, v = random_inputs(1, 2, 40, 8, dtype=dtype)
    qk[0, 0, 3, 2] = float("nan")
    fwd = ops.forward(emulated_cuda, qk, v, block_size=8, keep_ratio=0.5)
    grads = ops.backward(emulated_cuda, torch.ones_like(v), qk, v, fwd, block_size=8)
    assert torch.isnan(fwd.out[0, 0]).all()
    assert all(torch.isnan(g[0, 0]).all() for g in grads)
    assert torch.isfinite(fwd.out[0, 1]).all() and all(torch.isfinite(g[0, 1]).all() for g in grads)
