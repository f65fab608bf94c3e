"""The CUDA kernels through the public ops, against the reference (SPEC §6), and their
integration with torch: streams, devices, CUDA graphs, torch.compile, determinism.
Marked `cuda` and skipped without a GPU."""

import pytest
import torch
import torch.nn.functional as F

import bspf_ext
from bspf_ext import reference
from bspf_ext.ops import backends as _backends
from support import assert_close_to_reference, kernel_choices, random_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.skipif(not _backends.has_cuda_build(), reason="bspf_ext was built without CUDA"),
]

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]
BLOCKS = [1, 2, 7, 16, 32, 64]
# Gradients of low-precision inputs against a float64 reference that makes the kernel's
# own choices: the cast of the result to the input dtype dominates below float32.
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def cuda_inputs(b, h, n, d, dv=None, *, dtype=torch.float64, seed=0):
    return random_inputs(b, h, n, d, dv, dtype=dtype, device="cuda", seed=seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("n", [1, 5, 64, 197, 300])
def test_forward_matches_reference(dtype, block_size, n):
    qk, v = cuda_inputs(2, 3, n, 16, 8, dtype=dtype)
    assert_close_to_reference(qk, v, block_size=block_size, keep_ratio=0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", [16, 64])
def test_forward_long_sequence(dtype, block_size):
    # The forward keeps a strip's logits against every column in shared memory, so N is
    # bounded (a chunk of 64 rows of float64 logits fits about 300 columns); within the
    # limit the result is exact, past it the call names the limit.
    n = min(1024, _backends.cuda_max_seqlen(dtype, block_size, "cuda"))
    assert n >= 256
    qk, v = cuda_inputs(1, 2, n, 64, dtype=dtype)
    assert_close_to_reference(qk, v, block_size=block_size, keep_ratio=0.5)


@pytest.mark.parametrize("d,dv", [(1, 1), (3, 130), (160, 64)])
def test_forward_head_dims(d, dv):
    # D and Dv above one staged slice (16 and 64) exercise the tiling of both products.
    qk, v = cuda_inputs(1, 2, 77, d, dv)
    assert_close_to_reference(qk, v, block_size=16, keep_ratio=0.5)


@pytest.mark.parametrize("keep_ratio", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_keep_ratios_and_fuse(keep_ratio, fuse, dtype):
    qk, v = cuda_inputs(2, 2, 77, 12, 6, dtype=dtype)
    w = torch.softmax(torch.randn(9, dtype=torch.float64), 0).reshape(3, 3)
    w = ((w + w.T) / 2).to(device="cuda", dtype=dtype)
    assert_close_to_reference(qk, v, w, block_size=16, keep_ratio=keep_ratio, fuse=fuse)


def test_limits_are_dense_and_chunk_attention():
    qk, v = cuda_inputs(2, 3, 197, 16)
    dense = F.scaled_dot_product_attention(qk, qk, v)
    torch.testing.assert_close(bspf_ext.block_symmetric_attention(qk, v, keep_ratio=1.0), dense)
    chunk = torch.arange(197, device="cuda") // 16
    chunked = F.scaled_dot_product_attention(qk, qk, v, attn_mask=chunk[:, None] == chunk[None, :])
    torch.testing.assert_close(bspf_ext.block_symmetric_attention(qk, v, keep_ratio=0.0), chunked)


@pytest.mark.parametrize("n,block_size", [(197, 16), (37, 7), (64, 64), (9, 1), (300, 33)])
@pytest.mark.parametrize("keep_ratio", [0.0, 0.5, 1.0])
def test_block_mask_matches_reference(n, block_size, keep_ratio):
    qk, _ = cuda_inputs(2, 2, n, 8)
    got = bspf_ext.block_mask(qk, block_size=block_size, keep_ratio=keep_ratio)
    assert got.dtype == torch.bool and got.device == qk.device
    assert torch.equal(got, reference.block_mask(qk, block_size=block_size, keep_ratio=keep_ratio))


def test_mask_properties():
    # SPEC §6: M symmetric, diagonal blocks full, each upper block keeps exactly k.
    qk, _ = cuda_inputs(2, 3, 197, 16, dtype=torch.float32)
    mask = bspf_ext.block_mask(qk, block_size=16, keep_ratio=0.3).cpu()
    assert torch.equal(mask, mask.transpose(-1, -2))
    for m in range(13):
        for n in range(m, 13):
            block = mask[..., m * 16 : (m + 1) * 16, n * 16 : (n + 1) * 16]
            rows, cols = block.shape[-2:]
            expected = rows * cols if m == n else reference.keep_count(0.3, rows, cols)
            assert (block.sum((-1, -2)) == expected).all()


def test_ties_go_to_the_smaller_index():
    # Equal tokens and a centre-only kernel: every score is exactly equal, so each upper
    # block keeps its first k entries in row-major order (k = 64 = four rows of 16).
    qk = torch.ones(1, 1, 48, 4, dtype=torch.float32, device="cuda")
    centre = torch.zeros(3, 3, dtype=torch.float32, device="cuda")
    centre[1, 1] = 1.0
    mask = bspf_ext.block_mask(qk, centre, block_size=16, keep_ratio=0.25).cpu()[0, 0]
    for m, n in [(0, 1), (0, 2), (1, 2)]:
        block = mask[m * 16 : (m + 1) * 16, n * 16 : (n + 1) * 16]
        assert block[:4].all() and not block[4:].any()


def _grads(fn, qk, v, grad):
    qk, v = qk.detach().requires_grad_(), v.detach().requires_grad_()
    return torch.autograd.grad(fn(qk, v), (qk, v), grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,block_size,keep_ratio", [(197, 16, 0.5), (50, 7, 0.25), (33, 1, 0.5), (130, 64, 1.0)])
@pytest.mark.parametrize("fuse", [True, False])
def test_gradients_match_reference_autograd(dtype, n, block_size, keep_ratio, fuse):
    qk, v = cuda_inputs(2, 2, n, 12, 6, dtype=dtype)
    grad = torch.randn(2, 2, n, 6, dtype=torch.float64, device="cuda").to(dtype)
    kwargs = dict(block_size=block_size, keep_ratio=keep_ratio, fuse=fuse)
    got = _grads(lambda a, b: bspf_ext.block_symmetric_attention(a, b, **kwargs), qk, v, grad)
    # The reference in float64 on the same rounded inputs, with the kernel's own choices.
    _, mask, match = kernel_choices(qk, v, None, block_size=block_size, keep_ratio=keep_ratio, fuse=fuse)
    expected = _grads(
        lambda a, b: reference.block_symmetric_attention(a, b, mask=mask, match=match, **kwargs),
        qk.double(), v.double(), grad.double(),
    )
    rtol = GRAD_RTOL[dtype]
    for g, e in zip(got, expected):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=rtol * max(e.abs().max().item(), 1.0))


@pytest.mark.parametrize("n,block_size,fuse", [(23, 5, True), (16, 4, False), (9, 2, True), (70, 16, True)])
def test_gradcheck(n, block_size, fuse):
    qk, v = cuda_inputs(1, 2, n, 4, 3)
    qk.requires_grad_(), v.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: bspf_ext.block_symmetric_attention(a, b, block_size=block_size, fuse=fuse), (qk, v)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opcheck(dtype):
    qk, v = cuda_inputs(2, 2, 21, 8, 4, dtype=dtype)
    kernel = reference.box_score_kernel(dtype, "cuda")
    args = (qk.requires_grad_(), v.requires_grad_(), kernel, 8, 0.5, True, 0.3)
    torch.library.opcheck(torch.ops.bspf_ext.forward.default, args)
    torch.library.opcheck(torch.ops.bspf_ext.block_mask.default, (qk.detach(), kernel, 8, 0.5, 0.3))
    out, *saved = torch.ops.bspf_ext.forward(qk.detach(), v.detach(), kernel, 8, 0.5, True, 0.3)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.bspf_ext.backward.default, (grad, qk.detach(), v.detach(), *saved, 8, True, 0.3))


def _forward_backward(qk, v, grad, **kwargs):
    qk, v = qk.detach().requires_grad_(), v.detach().requires_grad_()
    out = bspf_ext.block_symmetric_attention(qk, v, **kwargs)
    return (out.detach(), *torch.autograd.grad(out, (qk, v), grad))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bitwise_deterministic(dtype):
    qk, v = cuda_inputs(4, 3, 197, 16, dtype=dtype)
    grad = torch.randn_like(v)
    runs = [_forward_backward(qk, v, grad) for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def test_non_default_stream():
    qk, v = cuda_inputs(3, 4, 197, 32, dtype=torch.float32)
    grad = torch.randn_like(v)
    expected = _forward_backward(qk, v, grad)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Work queued ahead on the side stream: the kernels must run after it, in order.
        a, b, g = (t.clone() for t in (qk, v, grad))
        got = _forward_backward(a, b, g)
    torch.cuda.current_stream().wait_stream(stream)
    for x, y in zip(got, expected):
        assert torch.equal(x, y)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device():
    qk, v = cuda_inputs(2, 3, 100, 16, dtype=torch.float32)
    grad = torch.randn_like(v)
    expected = _forward_backward(qk, v, grad)
    with torch.cuda.device(0):  # the current device is not the tensors' device
        got = _forward_backward(qk.to("cuda:1"), v.to("cuda:1"), grad.to("cuda:1"))
    for x, y in zip(got, expected):
        assert x.device == torch.device("cuda:1")
        assert torch.equal(x.cpu(), y.cpu())


def test_cuda_graph_capture():
    qk, v = cuda_inputs(2, 3, 197, 16, dtype=torch.float32)
    kernel = reference.box_score_kernel(torch.float32, "cuda")
    static_qk, static_v, static_grad = qk.clone(), v.clone(), torch.randn_like(v)

    def step():
        out, *saved = torch.ops.bspf_ext.forward(static_qk, static_v, kernel, 16, 0.5, True, 0.25)
        grads = torch.ops.bspf_ext.backward(static_grad, static_qk, static_v, *saved, 16, True, 0.25)
        return out, *grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    fresh_qk, fresh_v = cuda_inputs(2, 3, 197, 16, dtype=torch.float32, seed=1)
    static_qk.copy_(fresh_qk)
    static_v.copy_(fresh_v)
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for x, y in zip(captured, expected):
        assert torch.equal(x, y)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    qk, v = cuda_inputs(2, 3, 197, 32, dtype=torch.float32)
    grad = torch.randn_like(v)

    @torch.compile(fullgraph=True)
    def attend(a, b):
        return bspf_ext.block_symmetric_attention(a, b, block_size=16, keep_ratio=0.5) * 2

    a, b = qk.clone().requires_grad_(), v.clone().requires_grad_()
    out = attend(a, b)
    got = (out.detach(), *torch.autograd.grad(out, (a, b), grad))
    c, d = qk.clone().requires_grad_(), v.clone().requires_grad_()
    eager = bspf_ext.block_symmetric_attention(c, d, block_size=16, keep_ratio=0.5) * 2
    expected = (eager.detach(), *torch.autograd.grad(eager, (c, d), grad))
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_strided_and_expanded_inputs():
    base, vbase = cuda_inputs(2, 40, 3, 16, 8)  # (B, N, H, D) then transposed: non-contiguous
    qk, v = base.transpose(1, 2), vbase.transpose(1, 2)
    assert not qk.is_contiguous()
    assert_close_to_reference(qk, v, block_size=8, keep_ratio=0.5)
    one, vone = cuda_inputs(1, 1, 30, 8)
    assert_close_to_reference(one.expand(2, 3, 30, 8), vone.expand(2, 3, 30, 8), block_size=7, keep_ratio=0.5)
    grad = torch.randn(2, 3, 40, 8, dtype=torch.float64, device="cuda").transpose(-1, -2).contiguous()
    grad = grad.transpose(-1, -2)
    got = _grads(lambda a, b: bspf_ext.block_symmetric_attention(a, b), qk, v, grad)
    expected = _grads(lambda a, b: reference.block_symmetric_attention(a, b), qk, v, grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_empty_and_single_token(dtype):
    for shape in [(2, 3, 0, 4), (0, 3, 7, 4), (2, 0, 7, 4)]:
        qk = torch.zeros(shape, dtype=dtype, device="cuda", requires_grad=True)
        out = bspf_ext.block_symmetric_attention(qk, torch.zeros(*shape[:3], 5, dtype=dtype, device="cuda"))
        assert out.shape == (*shape[:3], 5)
        out.sum().backward()
        assert qk.grad.shape == shape
        assert bspf_ext.block_mask(qk.detach()).shape == (*shape[:3], shape[2])
    qk, v = cuda_inputs(2, 2, 1, 4, dtype=dtype)
    torch.testing.assert_close(bspf_ext.block_symmetric_attention(qk, v), v)


def test_nan_input_does_not_crash():
    qk, v = cuda_inputs(1, 2, 40, 8, dtype=torch.float32)
    qk[0, 0, 3, 2] = float("nan")
    out = bspf_ext.block_symmetric_attention(qk, v, block_size=8)
    torch.cuda.synchronize()
    assert out.shape == v.shape
    assert torch.isfinite(out[0, 1]).all()  # the other head is untouched


def test_too_long_sequence_is_rejected_with_the_limit():
    limit = _backends.cuda_max_seqlen(torch.float64, 64, "cuda")
    assert limit >= 256
    qk = torch.zeros(1, 1, limit + 1, 64, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match=f"the largest N it supports on this device is {limit}"):
        bspf_ext.block_symmetric_attention(qk, qk, block_size=64)
