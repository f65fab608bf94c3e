"""Shared checks for kernel tests: compare a kernel with the reference per SPEC §6."""

from __future__ import annotations

import torch

import bspf_ext  # noqa: F401  (registers the ops)
from bspf_ext import reference
from bspf_ext.ops.library import unpack_mask_words

# Relative near-tie window for float32 scores and cosines: far above float32 rounding of
# a dot product of a few hundred terms, far below the gaps between random scores.
NEAR_TIE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-12}
OUTPUT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# Gradients of low-precision inputs against a float64 reference that makes the kernel's
# own choices: the cast of the result to the input dtype dominates below float32.
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def random_inputs(b, h, n, d, dv=None, *, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    qk = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    v = torch.randn(b, h, n, dv or d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return qk, v


def kernel_choices(qk, v, score_kernel, *, block_size, keep_ratio, fuse=True, scale=None):
    """The kernel's output with its own discrete choices: (out, mask (B,H,N,N) bool, match)."""
    scale = qk.shape[-1] ** -0.5 if scale is None else scale
    if score_kernel is None:
        score_kernel = reference.box_score_kernel(qk.dtype, qk.device)
    out, words, match, *_ = torch.ops.bspf_ext.forward(qk, v, score_kernel, block_size, keep_ratio, fuse, scale)
    return out, unpack_mask_words(words, qk.shape[-2], block_size), match.long()


def assert_mask_near_float64(mask, qk, score_kernel, *, block_size, keep_ratio, scale=None, dtype=torch.float32):
    """SPEC §6 (a): the kernel's mask equals the float64 mask except at near-ties of the k-th score."""
    qk64 = qk.double()
    kernel64 = None if score_kernel is None else score_kernel.double()
    mask64 = reference.block_mask(qk64, kernel64, block_size=block_size, keep_ratio=keep_ratio, scale=scale)
    differ = mask.cpu() != mask64.cpu()
    if not differ.any():
        return
    scores = reference.block_scores(qk64, kernel64, block_size=block_size, scale=scale).cpu()
    mask64 = mask64.cpu()
    n = scores.shape[-1]
    for bi, hi, i, j in differ.nonzero().tolist():
        # Work on the upper block holding (i, j) or its mirror.
        if i // block_size > j // block_size:
            i, j = j, i
        m, c = i // block_size, j // block_size
        assert m != c, "diagonal blocks must be full"
        rows = slice(m * block_size, min((m + 1) * block_size, n))
        cols = slice(c * block_size, min((c + 1) * block_size, n))
        block = scores[bi, hi, rows, cols]
        kept = block[mask64[bi, hi, rows, cols]]
        assert kept.numel() > 0, f"entry ({i}, {j}) differs in a block that keeps nothing"
        kth = kept.min()
        window = NEAR_TIE[dtype] * max(block.abs().max().item(), 1e-30)
        assert abs(block[i - rows.start, j - cols.start] - kth) <= window, (
            f"mask differs at ({bi}, {hi}, {i}, {j}) with score {block[i - rows.start, j - cols.start]:.6g}, "
            f"not a near-tie of the k-th score {kth:.6g}"
        )


def assert_match_near_float64(match, qk, *, block_size, dtype=torch.float32):
    """A kernel's best match may differ from float64's only where the cosines nearly tie."""
    qk64 = qk.double().cpu()
    match = match.cpu()
    match64 = reference.best_match(qk64, block_size=block_size)
    for bi, hi, i in (match != match64).nonzero().tolist():
        x = qk64[bi, hi]
        def cos(a, c):
            return (x[a] @ x[c] / (x[a].norm() * x[c].norm()).clamp_min(1e-8)).item()
        assert abs(cos(i, match[bi, hi, i]) - cos(i, match64[bi, hi, i])) <= NEAR_TIE[dtype], (
            f"best match of token {i} differs and is not a near-tie"
        )


def assert_close_to_reference(qk, v, score_kernel=None, *, block_size, keep_ratio, fuse=True, scale=None):
    """SPEC §6: float64 to 1e-10; lower precision per the near-tie rule (kernel's own choices)."""
    out, mask, match = kernel_choices(
        qk, v, score_kernel, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse, scale=scale
    )
    kernel64 = None if score_kernel is None else score_kernel.double()
    if qk.dtype == torch.float64:
        expected = reference.block_symmetric_attention(
            qk, v, kernel64, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse, scale=scale
        )
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        return
    assert_mask_near_float64(mask, qk, score_kernel, block_size=block_size, keep_ratio=keep_ratio, scale=scale,
                             dtype=qk.dtype)
    assert_match_near_float64(match, qk, block_size=block_size, dtype=qk.dtype)
    expected = reference.block_symmetric_attention(
        qk.double(), v.double(), kernel64, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse, scale=scale,
        mask=mask, match=match,
    )
    rtol = OUTPUT_RTOL[qk.dtype]
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=rtol)
