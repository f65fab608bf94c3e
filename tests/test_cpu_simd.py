"""The vector CPU paths (AVX2+FMA, and AVX-512 where the CPU has it) against the reference
and against the portable path, each forced through BSPF_CPU_CAPABILITY (SPEC §6: float32
to 1e-5 with the near-tie rule). Every test of a vector path runs once per path this CPU
can run (the `vector_path` fixture).

The vector paths vectorise dot products and sums, so their float32 scores can round
differently from the portable path's: a mask may then differ at a near-tie of a block's
k-th score, and each path is compared with the float64 reference computed with its own
mask and match. On exactly representable inputs both paths must agree bit for bit on
the mask, ties included.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F

import bspf_ext
from bspf_ext import reference
from bspf_ext.ops.library import unpack_mask_words
from support import OUTPUT_RTOL, assert_mask_near_float64, assert_match_near_float64, random_inputs


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(re.search(r"^flags\s*:(.*)$", f.read(), re.M).group(1).split())
    except (OSError, AttributeError):
        return set()


HAS_AVX2 = {"avx2", "fma"} <= _cpu_flags()
HAS_AVX512 = HAS_AVX2 and "avx512f" in _cpu_flags()
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="this CPU has no AVX2+FMA")
needs_avx512 = pytest.mark.skipif(not HAS_AVX512, reason="this CPU has no AVX-512F")

RTOL = OUTPUT_RTOL[torch.float32]


@pytest.fixture
def capability(monkeypatch):
    """capability("avx2") forces a path for the calls that follow (scalar, avx2, avx512)."""

    def force(name: str) -> None:
        monkeypatch.setenv("BSPF_CPU_CAPABILITY", name)

    return force


@pytest.fixture(params=[pytest.param("avx2", marks=needs_avx2), pytest.param("avx512", marks=needs_avx512)])
def vector_path(request, capability):
    """Each vector path in turn, forced for the calls that follow."""
    capability(request.param)
    return request.param


def _inputs(b, h, n, d, dv=None, *, seed=0, dtype=torch.float32):
    return random_inputs(b, h, n, d, dv, dtype=dtype, seed=seed)


def _forward(qk, v, *, block_size, keep_ratio, fuse=True, scale=None, kernel=None):
    """The op's outputs: (out, mask (B,H,N,N) bool, match int64, saved buffers)."""
    scale = qk.shape[-1] ** -0.5 if scale is None else scale
    kernel = reference.box_score_kernel(qk.dtype) if kernel is None else kernel
    out, words, match, rho, lse, log_row_sum = torch.ops.bspf_ext.forward(
        qk, v, kernel, block_size, keep_ratio, fuse, scale
    )
    mask = unpack_mask_words(words, qk.shape[-2], block_size)
    return out, mask, match.long(), (words, match, rho, lse, log_row_sum)


def _reference_with(qk, v, mask, match, *, block_size, keep_ratio, fuse=True, scale=None, kernel=None):
    kernel64 = None if kernel is None else kernel.double()
    return reference.block_symmetric_attention(
        qk.double(), v.double(), kernel64, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse, scale=scale,
        mask=mask, match=match,
    )


def _check_path(qk, v, *, block_size, keep_ratio, fuse=True, scale=None, kernel=None):
    """The current path's forward against the reference per SPEC §6; returns its outputs."""
    out, mask, match, saved = _forward(qk, v, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse, scale=scale,
                                       kernel=kernel)
    assert_mask_near_float64(mask, qk, kernel, block_size=block_size, keep_ratio=keep_ratio, scale=scale)
    assert_match_near_float64(match, qk, block_size=block_size)
    expected = _reference_with(qk, v, mask, match, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse,
                               scale=scale, kernel=kernel)
    torch.testing.assert_close(out.double(), expected, rtol=RTOL, atol=RTOL)
    return out, mask, match, saved


# ------------------------------------------------------------------------ dispatch


def test_capability_reports_and_forces_the_path(capability):
    capability("scalar")
    assert bspf_ext.cpu_capability() == "scalar"
    for path, available in (("avx2", HAS_AVX2), ("avx512", HAS_AVX512)):
        if available:
            capability(path)
            assert bspf_ext.cpu_capability() == path
    os.environ.pop("BSPF_CPU_CAPABILITY")
    assert bspf_ext.cpu_capability() == ("avx512" if HAS_AVX512 else "avx2" if HAS_AVX2 else "scalar")


def test_invalid_capability_is_a_clear_error(capability):
    qk, v = _inputs(1, 1, 8, 4)
    capability("avx1024")
    with pytest.raises(ValueError, match="BSPF_CPU_CAPABILITY must be 'scalar', 'avx2' or 'avx512'"):
        bspf_ext.block_symmetric_attention(qk, v, block_size=4)
    with pytest.raises(ValueError, match="BSPF_CPU_CAPABILITY"):
        bspf_ext.block_symmetric_attention(qk.double(), v.double(), block_size=4)


@pytest.mark.parametrize(
    "path, message",
    [
        pytest.param("avx2", "does not support AVX2", marks=pytest.mark.skipif(HAS_AVX2, reason="has AVX2")),
        pytest.param("avx512", "does not support AVX-512", marks=pytest.mark.skipif(HAS_AVX512, reason="has AVX-512")),
    ],
)
def test_forcing_a_path_this_cpu_lacks_is_a_clear_error(capability, path, message):
    qk, v = _inputs(1, 1, 8, 4)
    capability(path)
    with pytest.raises(RuntimeError, match=message):
        bspf_ext.block_symmetric_attention(qk, v, block_size=4)


# ------------------------------------------------------------------------- forward

# (B, H, N, D, Dv): ragged tails, D and Dv not multiples of 8, Dv wider than one
# 32-column slice, N wider than 64 columns of bitmap words.
SHAPES = [
    (2, 3, 197, 64, 64),
    (1, 2, 37, 13, 11),
    (1, 1, 1, 5, 3),
    (1, 2, 5, 3, 7),
    (1, 1, 130, 20, 72),
    (1, 1, 300, 9, 40),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_size", [1, 7, 16, 64])
@pytest.mark.parametrize(
    "path", [pytest.param("avx2", marks=needs_avx2), pytest.param("avx512", marks=needs_avx512), "scalar"]
)
def test_forward_matches_reference(capability, path, shape, block_size):
    capability(path)
    qk, v = _inputs(*shape, seed=block_size)
    _check_path(qk, v, block_size=block_size, keep_ratio=0.5)


@pytest.mark.parametrize("block_size", range(1, 65))
def test_every_block_size(vector_path, block_size):
    qk, v = _inputs(1, 2, 67, 12, 10, seed=block_size)
    _check_path(qk, v, block_size=block_size, keep_ratio=0.37)


@pytest.mark.parametrize("keep_ratio", [0.0, 1.0])
@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_keep_ratio_limits(vector_path, keep_ratio, block_size):
    """keep_ratio 1 is dense attention and 0 is chunk attention (SPEC §1)."""
    qk, v = _inputs(2, 2, 45, 12, 9, seed=3)
    out, mask, *_ = _check_path(qk, v, block_size=block_size, keep_ratio=keep_ratio)
    chunk = torch.arange(45) // block_size
    assert torch.equal(mask[0, 0], torch.ones(45, 45, dtype=torch.bool) if keep_ratio else chunk[:, None] == chunk)
    if keep_ratio == 1.0:
        dense = F.scaled_dot_product_attention(qk.double(), qk.double(), v.double())
        torch.testing.assert_close(out.double(), dense, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("fuse", [True, False])
def test_options_scale_kernel_and_strides(vector_path, fuse):
    """fuse=False, a non-default scale (negative too), a non-box kernel, strided inputs."""
    base, v = _inputs(2, 21, 3, 40, seed=5)  # (B, N, H, D) then viewed as (B, H, N, D)
    qk = base.transpose(1, 2)
    v = v[..., :24].transpose(1, 2)
    assert not qk.is_contiguous() and not v.is_contiguous()
    kernel = torch.softmax(torch.randn(9, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 0)
    kernel = ((kernel.reshape(3, 3) + kernel.reshape(3, 3).T) / 2).float()
    for scale in (0.3, -0.2):
        _check_path(qk, v, block_size=6, keep_ratio=0.6, fuse=fuse, scale=scale, kernel=kernel)


@pytest.mark.parametrize("dv", [16, 24, 64])
@pytest.mark.parametrize("offset", [1, 4, 8])
def test_values_off_cache_lines_give_the_same_output(vector_path, dv, offset):
    """V whose rows start off 64-byte lines (a view `offset` floats into its storage) is
    gathered to aligned rows before A·V (24 floats never fill whole lines, so that one is
    read where it is at any offset): either way the output is the aligned V's bit for bit."""
    qk, v = _inputs(2, 3, 45, 16, dv, seed=8)
    storage = torch.empty(v.numel() + offset)
    shifted = storage[offset:].view(v.shape)
    shifted.copy_(v)
    assert shifted.data_ptr() % 64 != 0 and v.data_ptr() % 64 == 0
    expected = _forward(qk, v, block_size=8, keep_ratio=0.5)
    actual = _forward(qk, shifted, block_size=8, keep_ratio=0.5)
    for a, b in zip(actual[:3] + actual[3], expected[:3] + expected[3]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("keep_ratio", [0.05, 0.5, 0.93])
@pytest.mark.parametrize("shape", ["cubed", "sparse", "constant rows"])
def test_selection_with_scores_far_from_normal(vector_path, keep_ratio, shape):
    """The k-th score search starts where a normal distribution of the block's scores puts
    it; heavy tails, a spike of equal scores and constant blocks must still give the exact
    top k (SPEC §3.3), whatever that first guess is worth."""
    qk, v = _inputs(2, 2, 70, 8, seed=11)
    if shape == "cubed":
        qk = qk**3  # heavy tails: a few huge logits, most near 0
    elif shape == "sparse":
        qk = qk * (torch.rand(qk.shape, generator=torch.Generator().manual_seed(3)) < 0.15)  # many exact zeros
    else:
        qk = torch.ones_like(qk) * torch.arange(1, 71, dtype=qk.dtype)[:, None] / 64  # rank-1: smooth, tied rows
    _check_path(qk, v, block_size=16, keep_ratio=keep_ratio)


@pytest.mark.parametrize("spread", [1.0, 2.0, 4.0, 12.0])
@pytest.mark.parametrize("dv", [64, 16, 10])  # the 64-wide A·V path, the paired one, a padded one
def test_tokens_of_very_different_norms(vector_path, spread, dv):
    """The AVX2 forward shifts every logit by one bound (the largest |L_ii|) so that exp(L − c)
    is symmetric; rows far below the bound, whose sums would lose float32 precision, are
    recomputed with their own maximum. Token norms spread over a factor `spread` put rows
    on both sides of that line (none below it at 1, most at 4; logits reach ~770 at 12)."""
    qk, v = _inputs(2, 2, 75, 16, dv, seed=int(spread))
    order = torch.randperm(75, generator=torch.Generator().manual_seed(2))
    norms = torch.logspace(0, torch.log10(torch.tensor(spread)).item(), 75)[order]
    qk = (qk.double() * norms[:, None]).float()
    for fuse in (True, False):
        _check_path(qk, v, block_size=16, keep_ratio=0.5, fuse=fuse)

@pytest.mark.parametrize("block_size", [3, 8, 16])
def test_exact_scores_give_identical_masks_ties_included(capability, vector_path, block_size):
    """With integer inputs and a power-of-two kernel every score is exact in float32, so
    the two paths must choose the same entries, including among exactly tied scores
    (the smaller row-major index wins), and the same matches."""
    gen = torch.Generator().manual_seed(block_size)
    qk = torch.randint(-2, 3, (2, 2, 53, 8), generator=gen).float()
    qk[0, 1] = 1.0  # every score of a block tied, apart from the border effect of the padding
    v = torch.randn(2, 2, 53, 8, generator=gen)
    kernel = torch.full((3, 3), 0.125)
    results = {}
    for path in (vector_path, "scalar"):
        capability(path)
        results[path] = _forward(qk, v, block_size=block_size, keep_ratio=0.4, scale=1.0, kernel=kernel)
    assert torch.equal(results[vector_path][1], results["scalar"][1])
    assert torch.equal(results[vector_path][2], results["scalar"][2])
    mask64 = reference.block_mask(qk.double(), kernel.double(), block_size=block_size, keep_ratio=0.4, scale=1.0)
    assert torch.equal(results[vector_path][1], mask64)
    torch.testing.assert_close(results[vector_path][0], results["scalar"][0], rtol=RTOL, atol=RTOL)


@needs_avx512
@pytest.mark.parametrize("block_size", [4, 7, 16, 29, 64])
def test_vector_paths_choose_the_same_mask(capability, block_size):
    """The AVX-512 block scoring forms the AVX2 path's order keys bit for bit, and both run
    the same search: on any input they keep the same entries (not merely near-ties apart)."""
    qk, v = _inputs(2, 3, 197, 24, seed=block_size)
    masks = {}
    for path in ("avx2", "avx512"):
        capability(path)
        masks[path] = bspf_ext.block_mask(qk, block_size=block_size, keep_ratio=0.37)
    assert torch.equal(masks["avx2"], masks["avx512"])


def test_box_kernel_scores_whose_row_sums_overflow(vector_path):
    """With all nine weights equal the vector paths sum a score's logits first and weigh the
    sum once. Logits near 1.3e38 make those sums overflow float32 where the weighted terms do
    not: such a block must be scored term by term again, not ranked by inf."""
    gen = torch.Generator().manual_seed(5)
    qk = 4e18 * (1 + 0.05 * torch.randn(1, 2, 40, 8, generator=gen))
    logits = qk.double() @ qk.double().transpose(-1, -2)
    assert torch.isfinite((qk @ qk.transpose(-1, -2))).all()
    assert (logits[..., :-2, :] + logits[..., 1:-1, :] + logits[..., 2:, :]).max() > torch.finfo(torch.float32).max
    kernel = reference.box_score_kernel(torch.float32)
    mask = bspf_ext.block_mask(qk, kernel, block_size=8, keep_ratio=0.5, scale=1.0)
    assert_mask_near_float64(mask, qk, kernel, block_size=8, keep_ratio=0.5, scale=1.0)


def test_non_finite_scores_rank_as_on_the_portable_path(capability, vector_path):
    """A NaN or infinite entry of qk makes a row and a column of logits NaN or ±inf, and the
    scores that read them. The uniform kernel's scoring (all nine weights equal) forms its
    keys without the NaN → -inf step and counts on such a block being scored again term by
    term: NaN must still rank last and ±inf where they fall, as on the portable path. The
    other scores are exact (integer inputs, a power-of-two kernel), so the masks must be
    equal, ties included."""
    gen = torch.Generator().manual_seed(3)
    qk = torch.randint(-2, 3, (1, 3, 45, 8), generator=gen).float()
    qk[0, 0, 6, 2] = float("nan")
    qk[0, 1, 20, 5] = float("inf")
    qk[0, 2, 33, 0] = float("-inf")
    kernel = torch.full((3, 3), 0.125)
    masks = {}
    for path in (vector_path, "scalar"):
        capability(path)
        masks[path] = bspf_ext.block_mask(qk, kernel, block_size=8, keep_ratio=0.4, scale=1.0)
    assert torch.equal(masks[vector_path], masks["scalar"])


def test_block_mask_is_the_forward_mask(vector_path):
    qk, v = _inputs(2, 3, 90, 16, seed=7)
    _, mask, *_ = _forward(qk, v, block_size=8, keep_ratio=0.45)
    assert torch.equal(bspf_ext.block_mask(qk, block_size=8, keep_ratio=0.45), mask)


def test_paths_agree(capability, vector_path):
    """Where the two paths choose the same mask and matches, outputs agree to float32 rounding."""
    qk, v = _inputs(4, 6, 197, 64, seed=11)
    out_a, mask_a, match_a, _ = _forward(qk, v, block_size=16, keep_ratio=0.5)
    capability("scalar")
    out_s, mask_s, match_s, _ = _forward(qk, v, block_size=16, keep_ratio=0.5)
    same = (mask_a == mask_s).flatten(-2).all(-1) & (match_a == match_s).all(-1)  # per (b, h)
    assert same.float().mean() > 0.9
    torch.testing.assert_close(out_a[same], out_s[same], rtol=RTOL, atol=RTOL)


def test_float64_keeps_the_portable_path(capability, vector_path):
    """float64 runs the portable kernels under either setting, bit for bit."""
    qk, v = _inputs(1, 2, 40, 8, dtype=torch.float64)
    outs = []
    for path in (vector_path, "scalar"):
        capability(path)
        outs.append(bspf_ext.block_symmetric_attention(qk, v, block_size=8))
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------------ backward


def _grads(qk, v, saved, grad_out, *, block_size, fuse=True, scale=None):
    scale = qk.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.bspf_ext.backward(grad_out, qk, v, *saved, block_size, fuse, scale)


def _reference_grads(qk, v, mask, match, grad_out, *, block_size, keep_ratio, fuse=True):
    qk64 = qk.double().requires_grad_()
    v64 = v.double().requires_grad_()
    out = reference.block_symmetric_attention(qk64, v64, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse,
                                              mask=mask, match=match)
    out.backward(grad_out.double())
    return qk64.grad, v64.grad


def _assert_grads_close(actual, expected):
    for a, e in zip(actual, expected):
        # Relative to the gradient's scale: entries near zero are sums of cancelling terms.
        torch.testing.assert_close(a.double(), e, rtol=RTOL, atol=RTOL * e.abs().max().item())


@pytest.mark.parametrize(
    "shape, block_size, keep_ratio, fuse",
    [
        ((2, 3, 197, 64, 64), 16, 0.5, True),
        ((1, 2, 37, 13, 11), 7, 0.3, True),
        ((1, 1, 130, 20, 72), 64, 0.5, True),
        ((1, 2, 70, 8, 8), 1, 0.5, True),
        ((1, 2, 50, 12, 12), 5, 0.0, True),
        ((1, 2, 50, 12, 12), 5, 1.0, True),
        ((1, 2, 50, 12, 12), 8, 0.5, False),
        ((1, 1, 1, 4, 4), 4, 0.5, True),
    ],
)
def test_backward_matches_reference_autograd(vector_path, shape, block_size, keep_ratio, fuse):
    qk, v = _inputs(*shape, seed=2)
    grad_out = torch.randn(*shape[:3], shape[4], generator=torch.Generator().manual_seed(9))
    _, mask, match, saved = _forward(qk, v, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse)
    grads = _grads(qk, v, saved, grad_out, block_size=block_size, fuse=fuse)
    expected = _reference_grads(qk, v, mask, match, grad_out, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse)
    _assert_grads_close(grads, expected)


def test_backward_through_autograd_with_strided_grad(vector_path):
    qk, v = _inputs(2, 2, 33, 10, 6, seed=4)
    qk.requires_grad_()
    v.requires_grad_()
    out = bspf_ext.block_symmetric_attention(qk, v, block_size=4, keep_ratio=0.5)
    grad_out = torch.randn(2, 2, 6, 33).transpose(-1, -2)  # not contiguous
    out.backward(grad_out)
    _, mask, match, _ = _forward(qk.detach(), v.detach(), block_size=4, keep_ratio=0.5)
    expected = _reference_grads(qk.detach(), v.detach(), mask, match, grad_out, block_size=4, keep_ratio=0.5)
    _assert_grads_close((qk.grad, v.grad), expected)


@pytest.mark.parametrize("vector_forward", [True, False])
def test_saved_buffers_are_interchangeable(capability, vector_path, vector_forward):
    """One path's saved choices and statistics drive the other path's backward."""
    forward_path, backward_path = (vector_path, "scalar") if vector_forward else ("scalar", vector_path)
    qk, v = _inputs(2, 3, 83, 24, 16, seed=8)
    grad_out = torch.randn(2, 3, 83, 16, generator=torch.Generator().manual_seed(1))
    capability(forward_path)
    _, mask, match, saved = _forward(qk, v, block_size=8, keep_ratio=0.5)
    grads = {}
    for path in (forward_path, backward_path):
        capability(path)
        grads[path] = _grads(qk, v, saved, grad_out, block_size=8)
    expected = _reference_grads(qk, v, mask, match, grad_out, block_size=8, keep_ratio=0.5)
    _assert_grads_close(grads[backward_path], expected)
    _assert_grads_close(grads[backward_path], [g.double() for g in grads[forward_path]])


# --------------------------------------------------------------------- determinism


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_repeated_calls_are_bitwise_identical(vector_path, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        qk, v = _inputs(3, 3, 61, 16, seed=6)
        grad_out = torch.randn(3, 3, 61, 16)
        runs = []
        for _ in range(3):
            q = qk.clone().requires_grad_()
            w = v.clone().requires_grad_()
            out = bspf_ext.block_symmetric_attention(q, w, block_size=8, keep_ratio=0.5)
            out.backward(grad_out)
            runs.append((out.detach(), q.grad, w.grad))
        for run in runs[1:]:
            for a, b in zip(runs[0], run):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(previous)


def _with_threads(threads, fn, *args, **kwargs):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(previous)


def _forward_with_threads(threads, *args):
    return _with_threads(threads, torch.ops.bspf_ext.forward, *args)


def _other_values_in_scratch(threads, b, h, n, d, dv, block_size):
    # A forward and backward of other inputs of the same shape on `threads` threads: the
    # pooled scratch that the next team call shares then holds values unlike its own, so a
    # step a worker skipped, or read too early, shows.
    generator = torch.Generator().manual_seed(12345)
    qk, v, grad_out = (torch.randn(b, h, n, width, generator=generator) * 3 for width in (d, dv, dv))
    _, *saved = _forward_with_threads(threads, qk, v, reference.box_score_kernel(torch.float32), block_size, 0.5, True,
                                      d**-0.5)
    _with_threads(threads, torch.ops.bspf_ext.backward, grad_out, qk, v, *saved, block_size, True, d**-0.5)


# With fewer (batch, head) pairs than threads, or pairs left over when the threads do not
# divide them, those pairs are computed by all the threads together (dispatch.cpp,
# pairs_together: every stage shared out by chunks of rows). The output, every saved
# buffer and block_mask's mask must be the bits of one thread per pair. The cases cover
# chunks that do not fill 8-row bands (Ω = 7, 12), rows whose last chunk's vectors reach
# past the row's end (N = 37, Ω = 7; N = 53, Ω = 3), fewer chunks than threads, Dv off the
# vector width (the output copied back), a strided V (gathered), more threads than this
# machine's cores, and besides the box kernel with 1/√D another kernel (scored term by term)
# with a scale that is not a power of two (the matching divides).
@pytest.mark.parametrize("other_kernel_and_scale", [False, True])
@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize(
    "shape, block_size, dv, v_step",
    [
        ((1, 1, 197, 64), 16, 64, 1),
        ((1, 3, 61, 16), 8, 16, 1),
        ((1, 1, 33, 8), 7, 8, 2),
        ((2, 1, 100, 40), 12, 20, 1),
        ((1, 1, 5, 8), 16, 8, 1),
        ((1, 1, 300, 32), 64, 32, 2),
        ((1, 1, 37, 8), 7, 8, 1),
        ((1, 1, 53, 8), 3, 8, 1),
    ],
)
def test_threads_sharing_a_pair_give_the_bits_of_one_thread(vector_path, threads, shape, block_size, dv, v_step,
                                                            other_kernel_and_scale):
    b, h, n, d = shape
    qk, _ = random_inputs(b, h, n, d, dtype=torch.float32, seed=n)
    v = torch.randn(b, h, n, dv * v_step, generator=torch.Generator().manual_seed(n))[..., ::v_step]
    kernel, scale = reference.box_score_kernel(torch.float32), d**-0.5
    if other_kernel_and_scale:
        kernel = torch.tensor([[0.05, 0.1, 0.05], [0.1, 0.4, 0.1], [0.05, 0.1, 0.05]])
        scale = 0.3
    args = (qk, v, kernel, block_size, 0.5, True, scale)
    alone = _forward_with_threads(1, *args)
    _other_values_in_scratch(threads, b, h, n, d, dv, block_size)
    together = _forward_with_threads(threads, *args)
    for expected, got in zip(alone, together):
        assert torch.equal(got, expected)
    # block_mask's pairs likewise, through the same first steps.
    mask_args = (qk, kernel)
    mask_options = dict(block_size=block_size, keep_ratio=0.5, scale=scale)
    mask_alone = _with_threads(1, bspf_ext.block_mask, *mask_args, **mask_options)
    _other_values_in_scratch(threads, b, h, n, d, dv, block_size)
    mask_together = _with_threads(threads, bspf_ext.block_mask, *mask_args, **mask_options)
    assert torch.equal(mask_together, mask_alone)


def _backward_with_threads(threads, *args):
    return _with_threads(threads, torch.ops.bspf_ext.backward, *args)


# The backward's pairs left over likewise (dispatch.cpp, pairs_together): both gradients
# must be the bits of one thread per pair. Besides the forward's cases: D and Dv off the
# vector width (dX and dV through the scratch), a ragged last 4-row tile of dX (N = 37),
# strided gradients, and no fusion.
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(
    "shape, block_size, fuse, step",
    [
        ((1, 1, 197, 64, 64), 16, True, 1),
        ((1, 3, 61, 16, 16), 8, True, 1),
        ((1, 1, 37, 13, 11), 7, True, 2),
        ((2, 1, 100, 40, 20), 12, False, 1),
        ((1, 1, 5, 8, 8), 16, True, 1),
        ((1, 1, 300, 32, 72), 64, True, 2),
        ((1, 1, 70, 8, 8), 1, True, 1),
    ],
)
def test_threads_sharing_a_pair_give_the_backward_bits_of_one_thread(vector_path, threads, shape, block_size, fuse,
                                                                     step):
    b, h, n, d, dv = shape
    generator = torch.Generator().manual_seed(n)
    qk = torch.randn(b, h, n, d * step, generator=generator)[..., ::step]
    v = torch.randn(b, h, n, dv * step, generator=generator)[..., ::step]
    grad_out = torch.randn(b, h, n, dv * step, generator=generator)[..., ::step]
    _, *saved = _forward_with_threads(1, qk, v, reference.box_score_kernel(torch.float32), block_size, 0.5, fuse,
                                      d**-0.5)
    args = (grad_out, qk, v, *saved, block_size, fuse, d**-0.5)
    alone = _backward_with_threads(1, *args)
    _other_values_in_scratch(threads, b, h, n, d, dv, block_size)
    together = _backward_with_threads(threads, *args)
    for expected, got in zip(alone, together):
        assert torch.equal(got, expected)
    assert all(torch.isfinite(g).all() for g in together)


@pytest.mark.parametrize("where", ["qk nan", "qk inf", "v nan", "grad_out nan"])
@pytest.mark.parametrize("n, block_size", [(197, 16), (37, 7)])
def test_threads_sharing_a_pair_give_the_bits_of_one_thread_with_non_finite_inputs(vector_path, where, n,
                                                                                   block_size):
    # NaN and infinity go where one thread sends them, bit for bit (NaN payloads too).
    generator = torch.Generator().manual_seed(n)
    qk, v, grad_out = (torch.randn(1, 1, n, 64, generator=generator) for _ in range(3))
    tensor, value = where.split()
    {"qk": qk, "v": v, "grad_out": grad_out}[tensor][0, 0, n // 3, 5] = float(value)
    args = (qk, v, reference.box_score_kernel(torch.float32), block_size, 0.5, True, 0.125)
    alone = _forward_with_threads(1, *args)
    _other_values_in_scratch(2, 1, 1, n, 64, 64, block_size)
    together = _forward_with_threads(2, *args)
    backward_args = (grad_out, qk, v, *alone[1:], block_size, True, 0.125)
    grads_alone = _backward_with_threads(1, *backward_args)
    _other_values_in_scratch(2, 1, 1, n, 64, 64, block_size)
    grads_together = _backward_with_threads(2, *backward_args)
    for expected, got in [*zip(alone, together), *zip(grads_alone, grads_together)]:
        if got.dtype == torch.float32:
            expected, got = expected.view(torch.int32), got.view(torch.int32)
        assert torch.equal(got, expected)
    assert not torch.isfinite(together[0]).all() or tensor == "grad_out"


def test_threads_sharing_a_pair_hand_an_extreme_pair_to_the_portable_path(vector_path):
    # One pair, whose rows need the portable path in float32 (test_extreme_logits.py): the
    # workers that computed those rows say so, and the pair is computed there once, whole.
    from test_extreme_logits import extreme_inputs

    qk, v = extreme_inputs(1, 1, 70, 8, max_logit=1e5, dtype=torch.float32)
    args = (qk, v, reference.box_score_kernel(torch.float32), 16, 0.5, True, 8**-0.5)
    alone = _forward_with_threads(1, *args)
    together = _forward_with_threads(2, *args)
    for expected, got in zip(alone, together):
        assert torch.equal(got, expected)
    assert torch.isfinite(together[0]).all()
    backward_args = (torch.randn_like(v), qk, v, *alone[1:], 16, True, 8**-0.5)
    grads_alone = _backward_with_threads(1, *backward_args)
    grads_together = _backward_with_threads(2, *backward_args)
    for expected, got in zip(grads_alone, grads_together):
        assert torch.equal(got, expected)


def test_thread_count_does_not_change_results(vector_path):
    qk, v = _inputs(2, 3, 40, 8, seed=12)
    previous = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(bspf_ext.block_symmetric_attention(qk, v, block_size=8))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(outs[0], outs[1])

