"""CUDA-only integration with torch: the caller's stream, a second device, CUDA graph
capture, torch.compile, and the N limit of the CUDA kernels. The checks every device
shares (outputs, masks, gradients, opcheck, determinism) are in test_ops.py. Marked
`cuda` and skipped without a GPU."""

import pytest
import torch

import bspf_ext
from bspf_ext import reference
from bspf_ext.ops import backends
from support import random_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.skipif(not backends.has_cuda_build(), reason="bspf_ext was built without CUDA"),
]


def cuda_inputs(b, h, n, d, dv=None, *, dtype=torch.float64, seed=0):
    return random_inputs(b, h, n, d, dv, dtype=dtype, device="cuda", seed=seed)


def _forward_backward(qk, v, grad, **kwargs):
    qk, v = qk.detach().requires_grad_(), v.detach().requires_grad_()
    out = bspf_ext.block_symmetric_attention(qk, v, **kwargs)
    return (out.detach(), *torch.autograd.grad(out, (qk, v), grad))


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


def test_too_long_sequence_is_rejected_with_the_limit():
    limit = backends.cuda_max_seqlen(torch.float64, 64, "cuda")
    assert limit >= 256
    qk = torch.zeros(1, 1, limit + 1, 64, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match=f"the largest N it supports on this device is {limit}"):
        bspf_ext.block_symmetric_attention(qk, qk, block_size=64)
