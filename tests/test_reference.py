"""The reference (the oracle) against SPEC §3 and the properties of SPEC §6."""

import math

import pytest
import torch
import torch.nn.functional as F

from bspf_ext import reference
from naive import naive_bspf
from support import random_inputs

SHAPES = [(1, 1, 1, 4), (2, 3, 37, 8), (1, 2, 197, 16), (1, 1, 64, 5)]
BLOCKS = [1, 2, 7, 16, 32, 64]


def chunk_mask(n, block_size):
    chunk = torch.arange(n) // block_size
    return chunk[:, None] == chunk[None, :]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_size", BLOCKS)
def test_keep_ratio_one_is_dense_attention(shape, block_size):
    qk, v = random_inputs(*shape)
    out = reference.block_symmetric_attention(qk, v, block_size=block_size, keep_ratio=1.0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(qk, qk, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("fuse", [True, False])
def test_keep_ratio_zero_is_chunk_attention(shape, block_size, fuse):
    qk, v = random_inputs(*shape)
    out = reference.block_symmetric_attention(qk, v, block_size=block_size, keep_ratio=0.0, fuse=fuse)
    expected = F.scaled_dot_product_attention(qk, qk, v, attn_mask=chunk_mask(shape[2], block_size))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,block_size", [(197, 16), (37, 7), (64, 64), (10, 1), (100, 32)])
@pytest.mark.parametrize("keep_ratio", [0.0, 0.25, 0.5, 1.0])
def test_mask_structure(n, block_size, keep_ratio):
    qk, _ = random_inputs(2, 2, n, 8)
    mask = reference.block_mask(qk, block_size=block_size, keep_ratio=keep_ratio)
    assert mask.dtype == torch.bool and mask.shape == (2, 2, n, n)
    assert torch.equal(mask, mask.transpose(-1, -2)), "M must be symmetric"
    assert mask[..., chunk_mask(n, block_size)].all(), "diagonal blocks must be full"
    starts = range(0, n, block_size)
    for m, r0 in enumerate(starts):
        for c, c0 in enumerate(starts):
            if c <= m:
                continue
            block = mask[..., r0 : r0 + block_size, c0 : c0 + block_size]
            rows, cols = block.shape[-2:]
            k = math.ceil(keep_ratio * rows * cols - 1e-9)
            assert (block.sum((-1, -2)) == k).all(), f"block ({m}, {c}) must keep exactly {k}"


def test_fuse_false_is_renormalised_masked_softmax():
    qk, v = random_inputs(2, 3, 50, 8)
    mask = reference.block_mask(qk, block_size=8, keep_ratio=0.5)
    out = reference.block_symmetric_attention(qk, v, block_size=8, keep_ratio=0.5, fuse=False)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(qk, qk, v, attn_mask=mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,block_size,keep_ratio", [(11, 3, 0.5), (9, 4, 0.25), (13, 5, 0.75), (7, 1, 0.5), (16, 4, 0.3)])
@pytest.mark.parametrize("fuse", [True, False])
def test_matches_literal_transcription_of_spec(n, block_size, keep_ratio, fuse):
    qk, v = random_inputs(1, 1, n, 3, 2)
    w = torch.rand(3, 3, dtype=torch.float64)
    w = w + w.T
    expected, mask, match = naive_bspf(qk[0, 0], v[0, 0], w, block_size, keep_ratio, fuse)
    got = reference.block_symmetric_attention(qk, v, w, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse)
    assert torch.equal(reference.block_mask(qk, w, block_size=block_size, keep_ratio=keep_ratio)[0, 0], mask)
    assert torch.equal(reference.best_match(qk, block_size=block_size)[0, 0], match)
    torch.testing.assert_close(got[0, 0], expected, rtol=1e-12, atol=1e-12)


def test_fusion_changes_the_output_and_keeps_rows_normalised():
    qk, v = random_inputs(1, 2, 40, 4)
    fused = reference.block_symmetric_attention(qk, v, block_size=8, keep_ratio=0.5, fuse=True)
    pruned = reference.block_symmetric_attention(qk, v, block_size=8, keep_ratio=0.5, fuse=False)
    assert (fused - pruned).abs().max() > 1e-6
    ones = torch.ones_like(v)
    torch.testing.assert_close(reference.block_symmetric_attention(qk, ones, block_size=8), ones)


def test_ties_keep_the_smaller_row_major_index():
    # All logits equal: interior scores tie, so the first k interior entries in row-major order win.
    qk = torch.zeros(1, 1, 8, 2, dtype=torch.float64)
    qk[..., 0] = 1.0
    mask = reference.block_mask(qk, block_size=4, keep_ratio=3 / 16)
    scores = reference.block_scores(qk, block_size=4)[0, 0, :4, 4:]
    kept = mask[0, 0, :4, 4:]
    ties = (scores == scores.max()).flatten().nonzero().flatten()
    assert ties.numel() > 3
    assert kept.flatten().nonzero().flatten().tolist() == ties[:3].tolist()


def test_center_kernel_scores_are_the_logits():
    qk, _ = random_inputs(1, 1, 20, 4)
    center = torch.zeros(3, 3, dtype=torch.float64)
    center[1, 1] = 1.0
    scores = reference.block_scores(qk, center, block_size=5)
    logits = qk @ qk.transpose(-1, -2) * 0.5
    upper = ~scores.isnan()
    torch.testing.assert_close(scores[upper], logits[upper])


def test_single_token_attends_to_itself_and_empty_inputs():
    qk, v = random_inputs(1, 2, 1, 4, 3)
    torch.testing.assert_close(reference.block_symmetric_attention(qk, v), v)
    empty = reference.block_symmetric_attention(torch.zeros(2, 3, 0, 4), torch.zeros(2, 3, 0, 5))
    assert empty.shape == (2, 3, 0, 5)
    assert reference.block_symmetric_attention(torch.zeros(0, 3, 7, 4), torch.zeros(0, 3, 7, 5)).shape == (0, 3, 7, 5)


def test_gradcheck():
    qk, v = random_inputs(1, 2, 13, 4, 3)
    qk.requires_grad_(), v.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: reference.block_symmetric_attention(a, b, block_size=4, keep_ratio=0.5), (qk, v)
    )
