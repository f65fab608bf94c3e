"""The real CUDA kernels (csrc/cuda through api.cu and launch.cuh), compiled for the CPU
by tools/cuda_emulation, against the reference (SPEC §6): forward outputs and every
saved buffer, the backward's gradients, block_mask, determinism and the entry points'
errors. Mirrors tests/test_ops.py, which runs the same kernels on a GPU.

Cheap cases are dense (small N across every dtype and block size); the emulated GPU
runs one thread at a time, so long sequences and small blocks (many CTAs) are sparse.
"""

import re

import pytest
import torch
import torch.nn.functional as F

from bspf_ext import reference
from bspf_ext.ops import params as _params
from bspf_ext.ops.geometry import DTYPE_NAMES
from cuda_emulation import ops
from cuda_emulation.checks import check_backward, check_forward
from cuda_emulation.module import emulated_cuda  # noqa: F401  (fixture)
from support import random_inputs

pytestmark = pytest.mark.cuda_emulated

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]
BLOCKS = [1, 2, 7, 16, 33, 64]


def inputs(b, h, n, d, dv=None, *, dtype=torch.float64, seed=0):
    return random_inputs(b, h, n, d, dv, dtype=dtype, seed=seed)


# --------------------------------------------------------------------- forward

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("n", [1, 5, 40])
def test_forward_short_sequences(emulated_cuda, dtype, block_size, n):
    qk, v = inputs(1, 2, n, 16, 8, dtype=dtype)
    check_forward(emulated_cuda, qk, v, block_size=block_size, keep_ratio=0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,block_size", [(250, 16), (256, 64), (223, 33), (200, 7)])
def test_forward_long_sequences(emulated_cuda, dtype, n, block_size):
    qk, v = inputs(1, 2, n, 16, 8, dtype=dtype, seed=1)
    check_forward(emulated_cuda, qk, v, block_size=block_size, keep_ratio=0.5)


@pytest.mark.parametrize("n,block_size", [(101, 1), (130, 2)])
def test_forward_many_small_blocks(emulated_cuda, n, block_size):
    qk, v = inputs(1, 1, n, 8, 4, dtype=torch.float32, seed=2)
    check_forward(emulated_cuda, qk, v, block_size=block_size, keep_ratio=0.5)


@pytest.mark.parametrize("d", [1, 3, 24, 70])
@pytest.mark.parametrize("dv", [1, 5, 66])
def test_forward_head_dims(emulated_cuda, d, dv):
    # Neither multiples of 16 (the tensor-core depth) nor of 64 (a value slice).
    qk, v = inputs(1, 2, 45, d, dv, dtype=torch.float32)
    check_forward(emulated_cuda, qk, v, block_size=16, keep_ratio=0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d,dv", [(3, 66), (70, 5)])
def test_forward_head_dims_every_dtype(emulated_cuda, dtype, d, dv):
    qk, v = inputs(2, 1, 37, d, dv, dtype=dtype, seed=3)
    check_forward(emulated_cuda, qk, v, block_size=16, keep_ratio=0.5)


@pytest.mark.parametrize("keep_ratio", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_keep_ratios_and_fuse(emulated_cuda, keep_ratio, fuse, dtype):
    qk, v = inputs(2, 2, 53, 12, 6, dtype=dtype)
    w = torch.softmax(torch.randn(9, dtype=torch.float64), 0).reshape(3, 3)
    w = ((w + w.T) / 2).to(dtype)
    check_forward(emulated_cuda, qk, v, w, block_size=16, keep_ratio=keep_ratio, fuse=fuse)


def test_limits_are_dense_and_chunk_attention(emulated_cuda):
    qk, v = inputs(2, 3, 97, 16)
    dense = F.scaled_dot_product_attention(qk, qk, v)
    out = ops.forward(emulated_cuda, qk, v, block_size=16, keep_ratio=1.0).out
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)
    chunk = torch.arange(97) // 16
    chunked = F.scaled_dot_product_attention(qk, qk, v, attn_mask=chunk[:, None] == chunk[None, :])
    out = ops.forward(emulated_cuda, qk, v, block_size=16, keep_ratio=0.0).out
    torch.testing.assert_close(out, chunked, rtol=1e-10, atol=1e-10)


def test_strided_and_expanded_inputs(emulated_cuda):
    base, vbase = inputs(2, 40, 3, 16, 8)  # (B, N, H, D) viewed as (B, H, N, D): not contiguous
    qk, v = base.transpose(1, 2), vbase.transpose(1, 2)
    assert not qk.is_contiguous() and not v.is_contiguous()
    fwd = check_forward(emulated_cuda, qk, v, block_size=8, keep_ratio=0.5)
    grad = torch.randn(2, 3, 8, 40, dtype=torch.float64).transpose(-1, -2)  # strided grad_out
    check_backward(emulated_cuda, qk, v, grad, fwd, block_size=8)
    one, vone = inputs(1, 1, 30, 8)
    qk, v = one.expand(2, 3, 30, 8), vone.expand(2, 3, 30, 8)  # stride 0 over (B, H)
    fwd = check_forward(emulated_cuda, qk, v, block_size=7, keep_ratio=0.5)
    check_backward(emulated_cuda, qk, v, torch.randn(2, 3, 30, 8, dtype=torch.float64), fwd, block_size=7)


def test_more_pairs_than_the_grid_covers(emulated_cuda):
    # The grid's y dimension stops at 65535 (b, h) pairs; the kernels loop over the rest.
    pairs = 65535 + 3
    qk, v = inputs(1, 3, 2, 2, 1, dtype=torch.float32, seed=4)
    qk, v = qk.repeat(pairs // 3, 1, 1, 1), v.repeat(pairs // 3, 1, 1, 1)  # the tail pairs differ
    qk[-1] *= -2.0
    v[-1] += 1.0
    fwd = check_forward(emulated_cuda, qk, v, block_size=1, keep_ratio=0.5)
    check_backward(emulated_cuda, qk, v, torch.ones_like(v), fwd, block_size=1)


def test_nan_input_stays_in_its_head(emulated_cuda):
    qk, v = inputs(1, 2, 40, 8, dtype=torch.float32)
    qk[0, 0, 3, 2] = float("nan")
    out = ops.forward(emulated_cuda, qk, v, block_size=8, keep_ratio=0.5).out
    assert torch.isfinite(out[0, 1]).all()
    expected = reference.block_symmetric_attention(qk[:, 1:].double(), v[:, 1:].double(), block_size=8)
    torch.testing.assert_close(out[:, 1:].double(), expected, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------- backward

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,block_size,keep_ratio", [(197, 16, 0.5), (50, 7, 0.25), (33, 1, 0.5), (130, 64, 1.0)])
@pytest.mark.parametrize("fuse", [True, False])
def test_gradients_match_reference_autograd(emulated_cuda, dtype, n, block_size, keep_ratio, fuse):
    qk, v = inputs(2, 2, n, 12, 6, dtype=dtype)
    grad = torch.randn(2, 2, n, 6, dtype=torch.float64).to(dtype)
    fwd = check_forward(emulated_cuda, qk, v, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse)
    check_backward(emulated_cuda, qk, v, grad, fwd, block_size=block_size, fuse=fuse)


@pytest.mark.parametrize("block_size", [2, 33])
@pytest.mark.parametrize("d,dv", [(3, 66), (70, 1)])
def test_gradients_odd_sizes(emulated_cuda, block_size, d, dv):
    qk, v = inputs(1, 2, 71, d, dv)
    fwd = check_forward(emulated_cuda, qk, v, block_size=block_size, keep_ratio=0.5)
    check_backward(emulated_cuda, qk, v, torch.randn(1, 2, 71, dv, dtype=torch.float64), fwd, block_size=block_size)


# ------------------------------------------------------------------ block_mask

@pytest.mark.parametrize("n,block_size", [(197, 16), (37, 7), (64, 64), (9, 1), (150, 33), (21, 2)])
@pytest.mark.parametrize("keep_ratio", [0.0, 0.5, 1.0])
def test_block_mask_matches_reference(emulated_cuda, n, block_size, keep_ratio):
    qk, _ = inputs(2, 2, n, 8)
    words = ops.mask_words(emulated_cuda, qk, block_size=block_size, keep_ratio=keep_ratio)
    got = ops.unpack_mask_words(words, n, block_size)
    assert torch.equal(got, reference.block_mask(qk, block_size=block_size, keep_ratio=keep_ratio))
    fwd = ops.forward(emulated_cuda, qk, qk[..., :1], block_size=block_size, keep_ratio=keep_ratio)
    assert torch.equal(words, fwd.mask_words), "block_mask and the forward disagree"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS[1:])
def test_block_mask_low_precision_near_ties(emulated_cuda, dtype):
    from cuda_emulation.checks import assert_mask_words_well_formed
    from support import assert_mask_near_float64

    qk, _ = inputs(2, 3, 120, 16, dtype=dtype)
    words = ops.mask_words(emulated_cuda, qk, block_size=16, keep_ratio=0.3)
    assert_mask_words_well_formed(words, 120, 16, 0.3)
    mask = ops.unpack_mask_words(words, 120, 16)
    assert_mask_near_float64(mask, qk, None, block_size=16, keep_ratio=0.3, dtype=dtype)


def test_ties_go_to_the_smaller_index(emulated_cuda):
    # Equal tokens, centre-only kernel: all scores tie, so each upper block keeps its first
    # k entries in row-major order (k = 64 = four rows of 16).
    qk = torch.ones(1, 1, 48, 4, dtype=torch.float32)
    centre = torch.zeros(3, 3, dtype=torch.float32)
    centre[1, 1] = 1.0
    mask = ops.block_mask(emulated_cuda, qk, centre, block_size=16, keep_ratio=0.25)[0, 0]
    for m, c in [(0, 1), (0, 2), (1, 2)]:
        block = mask[m * 16:(m + 1) * 16, c * 16:(c + 1) * 16]
        assert block[:4].all() and not block[4:].any()


# -------------------------------------------------------------- determinism

def _forward_backward(cuda, qk, v, grad, **kwargs):
    fwd = ops.forward(cuda, qk, v, **kwargs)
    kwargs.pop("keep_ratio")
    return (*fwd, *ops.backward(cuda, grad, qk, v, fwd, **kwargs))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bitwise_deterministic_under_any_schedule(emulated_cuda, dtype, monkeypatch):
    # Repeated runs, and runs whose threads and CTAs the emulator interleaves in other
    # orders (a GPU's order is arbitrary), give identical bits.
    qk, v = inputs(3, 2, 100, 16, dtype=dtype)
    grad = torch.randn(3, 2, 100, 16, dtype=torch.float64).to(dtype)
    kwargs = dict(block_size=16, keep_ratio=0.5, fuse=True)
    first = _forward_backward(emulated_cuda, qk, v, grad, **kwargs)
    for seed in ["0", "1", "2"]:
        monkeypatch.setenv("BSPF_EMULATION_SCHEDULE", seed)
        again = _forward_backward(emulated_cuda, qk, v, grad, **kwargs)
        for a, b in zip(first, again):
            assert torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point else a,
                               b.view(torch.uint8) if b.dtype.is_floating_point else b), f"schedule {seed}"


# ------------------------------------------------------- empty and single token

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_empty_and_single_token(emulated_cuda, dtype):
    for shape in [(2, 3, 0, 4), (0, 3, 7, 4), (2, 0, 7, 4)]:
        qk = torch.zeros(shape, dtype=dtype)
        v = torch.zeros(*shape[:3], 5, dtype=dtype)
        fwd = ops.forward(emulated_cuda, qk, v, block_size=16, keep_ratio=0.5)  # launches nothing, raises nothing
        assert fwd.out.shape == (*shape[:3], 5)
        grads = ops.backward(emulated_cuda, torch.zeros_like(v), qk, v, fwd, block_size=16)
        assert grads[0].shape == shape and grads[1].shape == v.shape
        ops.mask_words(emulated_cuda, qk, block_size=16, keep_ratio=0.5)
    qk, v = inputs(2, 2, 1, 4, dtype=dtype)
    fwd = check_forward(emulated_cuda, qk, v, block_size=16, keep_ratio=0.5)
    torch.testing.assert_close(fwd.out, v, rtol=0, atol=0)  # a single token attends to itself
    check_backward(emulated_cuda, qk, v, torch.ones_like(v), fwd, block_size=16)


# ------------------------------------------------------------------- errors

def _params_for(cuda, qk_tensor, v_tensor, out_tensor, saved, kernel, /, **overrides):
    """Forward params of block size 16, keep 0.5; overrides set a field of the problem or of the
    params themselves (a pointer field to 0 for null). The tensors must outlive the params,
    which hold only their addresses."""
    fp = _params.forward_params(cuda, qk_tensor, v_tensor, kernel, 16, 0.5, True, 0.5, out_tensor, saved, 0)
    for name, value in overrides.items():
        if name in ("block_size", "head_dim", "value_dim", "seqlen", "batch"):
            p = fp.p
            setattr(p, name, value)
            fp.p = p
        else:
            setattr(fp, name, value)
    return fp


def test_bad_params_raise_value_error(emulated_cuda):
    qk, v = inputs(1, 1, 20, 4, dtype=torch.float32)
    fwd = ops.forward(emulated_cuda, qk, v, block_size=16, keep_ratio=0.5)
    saved = _params.saved(emulated_cuda, *fwd[1:])
    kernel = _params.score_kernel_buffer(reference.box_score_kernel(qk.dtype), qk.dtype)
    cases = [
        (dict(block_size=0), "block_size"),
        (dict(block_size=65), "block_size"),
        (dict(head_dim=0), None),
        (dict(batch=-1), None),
        (dict(qk=0), "qk is null"),
        (dict(score_kernel=0), "score_kernel is null"),
        (dict(out=0), "out is null"),
    ]
    for overrides, words in cases:
        params = _params_for(emulated_cuda, qk, v, fwd.out, saved, kernel, **overrides)
        with pytest.raises(ValueError, match=words):
            emulated_cuda.forward(params, 0, 0)
    empty_saved = emulated_cuda.Saved()
    with pytest.raises(ValueError, match="null"):
        emulated_cuda.forward(_params_for(emulated_cuda, qk, v, fwd.out, empty_saved, kernel), 0, 0)
    with pytest.raises(ValueError, match="null"):
        emulated_cuda.mask(_params_for(emulated_cuda, qk, v, fwd.out, empty_saved, kernel), 0, 0)
    workspace = emulated_cuda.BackwardWorkspace()  # all null
    bp = _params.backward_params(emulated_cuda, v, qk, v, saved, 16, True, 0.5, qk.clone(), v.clone(), 0)
    with pytest.raises(ValueError, match="null"):
        emulated_cuda.backward(bp, workspace, 0, 0)


def test_cuda_errors_raise_runtime_error(emulated_cuda):
    # The emulated machine has one GPU: device 1 fails in the runtime, not in a check of ours.
    qk, v = inputs(1, 1, 20, 4, dtype=torch.float32)
    fwd = ops.forward(emulated_cuda, qk, v, block_size=16, keep_ratio=0.5)
    kernel = _params.score_kernel_buffer(reference.box_score_kernel(qk.dtype), qk.dtype)
    params = _params_for(emulated_cuda, qk, v, fwd.out, _params.saved(emulated_cuda, *fwd[1:]), kernel)
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        emulated_cuda.forward(params, 1, 0)
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        emulated_cuda.max_seqlen(emulated_cuda.DType.float32, 16, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_too_long_sequence_is_rejected_with_the_limit(emulated_cuda, dtype):
    # max_seqlen is the smallest of the ops' limits (for head dims of 64): one N past it,
    # the op that binds raises ValueError naming the limit; the other may run.
    limit = emulated_cuda.max_seqlen(getattr(emulated_cuda.DType, DTYPE_NAMES[dtype]), 64, 0)
    assert limit >= 256
    qk, v = inputs(1, 1, limit + 1, 64, dtype=dtype)
    with pytest.raises(ValueError) as failure:
        fwd = ops.forward(emulated_cuda, qk, v, block_size=64, keep_ratio=0.5)
        ops.backward(emulated_cuda, torch.ones_like(v), qk, v, fwd, block_size=64)
    assert re.search(rf"largest (supported )?N .*\b{limit}\b", str(failure.value)), str(failure.value)
