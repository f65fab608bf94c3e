"""SPEC §6 comparisons of the emulated CUDA kernels with the reference, shared by the
cuda_emulated tests and the sanitizer subprocesses (sanitized.py).

As tests/support.py's assert_close_to_reference: float64 to 1e-10 against the plain
reference; below float64 the kernel's mask and matches may differ from float64's only at
near-ties, and its outputs must equal the float64 reference computed with the kernel's
own mask= and match= on the same rounded inputs. Gradients use support.py's
GRAD_RTOL. Every saved buffer is checked too (mask words bit for bit, match, ρ, lse, log Z).
"""

from __future__ import annotations

import torch

from bspf_ext import reference
from support import OUTPUT_RTOL, assert_mask_near_float64, assert_match_near_float64
from support import GRAD_RTOL

from . import ops


def _scale(qk, scale):
    return qk.shape[-1] ** -0.5 if scale is None else scale


def assert_mask_words_well_formed(words: torch.Tensor, n: int, block_size: int, keep_ratio: float) -> None:
    """No bit beyond a chunk's size; M symmetric; diagonal blocks full; every upper block
    keeps exactly k = keep_count(r, rows, cols) entries (SPEC §6)."""
    chunks = words.shape[-1]
    sizes = [min(block_size, n - c * block_size) for c in range(chunks)]
    for c, size in enumerate(sizes):
        if size < 64:
            assert (words[..., c] >> size == 0).all(), f"bits beyond chunk {c}'s {size} columns are set"
    mask = ops.unpack_mask_words(words, n, block_size)
    assert torch.equal(mask, mask.transpose(-1, -2)), "the mask is not symmetric"
    for m in range(chunks):
        rows = slice(m * block_size, m * block_size + sizes[m])
        assert mask[..., rows, rows].all(), f"diagonal block {m} is not full"
        for c in range(m + 1, chunks):
            cols = slice(c * block_size, c * block_size + sizes[c])
            kept = mask[..., rows, cols].sum((-1, -2))
            expected = reference.keep_count(keep_ratio, sizes[m], sizes[c])
            assert (kept == expected).all(), f"block ({m}, {c}) keeps {kept.unique().tolist()}, not {expected}"


def row_statistics(qk64, mask, match, *, block_size, fuse, scale):
    """(ρ, lse, log Z) of SPEC §3 in float64, with the given mask and matches."""
    logits = _scale(qk64, scale) * (qk64 @ qk64.transpose(-1, -2))
    probs = torch.softmax(logits, -1)
    kept = mask.to(probs.dtype)
    weights = probs * kept
    match, rho = reference._match_and_rho(qk64, block_size, match)
    if fuse:
        similarity = reference._pattern_similarity(mask, match, block_size).to(probs.dtype)
        share = rho[..., None] * similarity * probs * (1.0 - kept)
        weights = weights + torch.zeros_like(probs).scatter_add(-2, match[..., None].expand_as(probs), share) * kept
    return rho, torch.logsumexp(logits, -1), weights.sum(-1).log()


def _assert_close(got, expected, rtol, what):
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def check_forward(cuda, qk, v, score_kernel=None, *, block_size, keep_ratio, fuse=True, scale=None) -> ops.Forward:
    """Runs the emulated forward and checks every output; returns them."""
    fwd = ops.forward(cuda, qk, v, score_kernel, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse, scale=scale)
    n = qk.shape[-2]
    if fwd.mask_words.numel() == 0:
        return fwd
    assert_mask_words_well_formed(fwd.mask_words, n, block_size, keep_ratio)
    mask = ops.forward_mask(fwd, n, block_size)
    match = fwd.match.long()
    assert ((match >= 0) & (match < n)).all() and (match // block_size == torch.arange(n) // block_size).all(), (
        "a match lies outside its token's chunk"
    )
    kernel64 = None if score_kernel is None else score_kernel.double()
    qk64, v64 = qk.double(), v.double()
    rtol = OUTPUT_RTOL[qk.dtype]
    if qk.dtype == torch.float64:
        expected_mask = reference.block_mask(qk, kernel64, block_size=block_size, keep_ratio=keep_ratio, scale=scale)
        assert torch.equal(mask, expected_mask), "float64 mask differs from the reference"
        assert torch.equal(match, reference.best_match(qk, block_size=block_size)), "float64 matches differ"
        expected = reference.block_symmetric_attention(qk, v, kernel64, block_size=block_size, keep_ratio=keep_ratio,
                                                       fuse=fuse, scale=scale)
    else:
        assert_mask_near_float64(mask, qk, score_kernel, block_size=block_size, keep_ratio=keep_ratio, scale=scale,
                                 dtype=qk.dtype)
        assert_match_near_float64(match, qk, block_size=block_size, dtype=qk.dtype)
        expected = reference.block_symmetric_attention(qk64, v64, kernel64, block_size=block_size,
                                                       keep_ratio=keep_ratio, fuse=fuse, scale=scale, mask=mask,
                                                       match=match)
    assert fwd.out.dtype == qk.dtype
    torch.testing.assert_close(fwd.out.double(), expected, rtol=rtol, atol=rtol)
    rho, lse, log_row_sum = row_statistics(qk64, mask, match, block_size=block_size, fuse=fuse, scale=scale)
    # The statistics are kept in float32 below float64: compare at float32's tolerance or the input's.
    stat_rtol = max(rtol, OUTPUT_RTOL[torch.float32])
    stats = [("rho", fwd.rho, rho), ("lse", fwd.lse, lse), ("log_row_sum", fwd.log_row_sum, log_row_sum)]
    for name, got, want in stats:
        _assert_close(got, want, stat_rtol, name)
    return fwd


def reference_gradients(qk, v, grad, mask, match, *, block_size, fuse, scale=None):
    """Autograd through the float64 reference on the same rounded inputs, with the kernel's choices."""
    a = qk.detach().double().requires_grad_()
    b = v.detach().double().requires_grad_()
    out = reference.block_symmetric_attention(a, b, block_size=block_size, fuse=fuse, scale=scale, mask=mask,
                                              match=match)
    return torch.autograd.grad(out, (a, b), grad.double())


def check_backward(cuda, qk, v, grad, fwd: ops.Forward, *, block_size, fuse=True, scale=None):
    """Runs the emulated backward from `fwd`'s saved buffers and checks both gradients."""
    got = ops.backward(cuda, grad, qk, v, fwd, block_size=block_size, fuse=fuse, scale=scale)
    if fwd.mask_words.numel() == 0:
        return got
    n = qk.shape[-2]
    expected = reference_gradients(qk, v, grad, ops.forward_mask(fwd, n, block_size), fwd.match.long(),
                                   block_size=block_size, fuse=fuse, scale=scale)
    rtol = GRAD_RTOL[qk.dtype]
    for name, g, e in zip(("grad_qk", "grad_v"), got, expected):
        assert g.dtype == qk.dtype
        _assert_close(g, e, rtol, name)
    return got
