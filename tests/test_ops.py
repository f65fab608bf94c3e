"""The public ops against the reference (SPEC §6) on every device: written once, run on the
CPU and, where a GPU and the CUDA build are present, on CUDA. The CPU's SIMD paths are
compared in test_cpu_simd.py; CUDA's integration with torch (streams, graphs, devices,
compile) in test_ops_cuda.py."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import bspf_ext
from bspf_ext import reference
from bspf_ext.ops import backends
from support import GRAD_RTOL, assert_close_to_reference, kernel_choices, random_inputs

CUDA_MARKS = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.skipif(not backends.has_cuda_build(), reason="bspf_ext was built without CUDA"),
]
# Every dtype a device's kernels take (CPU: float32 and float64).
DTYPES = {
    "cpu": [torch.float64, torch.float32],
    "cuda": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
}
BLOCKS = [1, 2, 7, 16, 32, 64]


def pytest_generate_tests(metafunc):
    """`device` runs a test on every device; `device` with `dtype` on every dtype that
    device's kernels take (no skipped pairs for what a device does not claim)."""
    marks = {"cpu": [], "cuda": CUDA_MARKS}
    if "dtype" in metafunc.fixturenames:
        pairs = [
            pytest.param(device, dtype, marks=marks[device], id=f"{device}-{str(dtype).removeprefix('torch.')}")
            for device, dtypes in DTYPES.items()
            for dtype in dtypes
        ]
        metafunc.parametrize(("device", "dtype"), pairs)
    elif "device" in metafunc.fixturenames:
        metafunc.parametrize("device", [pytest.param(device, marks=marks[device], id=device) for device in DTYPES])


def inputs(device, b, h, n, d, dv=None, *, dtype=torch.float64, seed=0):
    return random_inputs(b, h, n, d, dv, dtype=dtype, device=device, seed=seed)


def _grads(fn, qk, v, grad):
    qk, v = qk.detach().requires_grad_(), v.detach().requires_grad_()
    return torch.autograd.grad(fn(qk, v), (qk, v), grad)


def _forward_backward(qk, v, grad, **kwargs):
    qk, v = qk.detach().requires_grad_(), v.detach().requires_grad_()
    out = bspf_ext.block_symmetric_attention(qk, v, **kwargs)
    return (out.detach(), *torch.autograd.grad(out, (qk, v), grad))


# ----------------------------------------------------------------------- forward


@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("n", [1, 5, 64, 197, 300])
def test_forward_matches_reference(device, dtype, block_size, n):
    qk, v = inputs(device, 2, 3, n, 16, 8, dtype=dtype)
    assert_close_to_reference(qk, v, block_size=block_size, keep_ratio=0.5)


@pytest.mark.parametrize("block_size", [16, 64])
def test_forward_long_sequence(device, dtype, block_size):
    # The CUDA forward keeps a strip's logits against every column in shared memory, so N
    # is bounded there (a chunk of 64 rows of float64 logits fits about 300 columns);
    # within the limit the result is exact, past it the call names the limit.
    n = 1024 if device == "cpu" else min(1024, backends.cuda_max_seqlen(dtype, block_size, device))
    assert n >= 256
    qk, v = inputs(device, 1, 2, n, 64, dtype=dtype)
    assert_close_to_reference(qk, v, block_size=block_size, keep_ratio=0.5)


@pytest.mark.parametrize("d,dv", [(1, 1), (3, 130), (160, 64)])
def test_forward_head_dims(device, d, dv):
    # D and Dv above one vector or staged slice exercise the tiling of both products.
    qk, v = inputs(device, 1, 2, 77, d, dv)
    assert_close_to_reference(qk, v, block_size=16, keep_ratio=0.5)


@pytest.mark.parametrize("keep_ratio", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("working", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_forward_keep_ratios_and_fuse(device, keep_ratio, fuse, working):
    qk, v = inputs(device, 2, 2, 77, 12, 6, dtype=working)
    w = torch.softmax(torch.randn(9, dtype=torch.float64), 0).reshape(3, 3)
    w = ((w + w.T) / 2).to(device=device, dtype=working)
    assert_close_to_reference(qk, v, w, block_size=16, keep_ratio=keep_ratio, fuse=fuse)


def test_limits_are_dense_and_chunk_attention(device):
    qk, v = inputs(device, 2, 3, 197, 16)
    dense = F.scaled_dot_product_attention(qk, qk, v)
    torch.testing.assert_close(bspf_ext.block_symmetric_attention(qk, v, keep_ratio=1.0), dense)
    chunk = torch.arange(197, device=device) // 16
    chunked = F.scaled_dot_product_attention(qk, qk, v, attn_mask=chunk[:, None] == chunk[None, :])
    torch.testing.assert_close(bspf_ext.block_symmetric_attention(qk, v, keep_ratio=0.0), chunked)


def test_strided_and_expanded_inputs(device):
    base, vbase = inputs(device, 2, 40, 3, 16, 8)  # (B, N, H, D) then transposed: non-contiguous
    qk, v = base.transpose(1, 2), vbase.transpose(1, 2)
    assert not qk.is_contiguous()
    assert_close_to_reference(qk, v, block_size=8, keep_ratio=0.5)
    one, vone = inputs(device, 1, 1, 30, 8)
    assert_close_to_reference(one.expand(2, 3, 30, 8), vone.expand(2, 3, 30, 8), block_size=7, keep_ratio=0.5)
    grad = torch.randn(2, 3, 40, 8, dtype=torch.float64, device=device).transpose(-1, -2).contiguous()
    grad = grad.transpose(-1, -2)
    got = _grads(lambda a, b: bspf_ext.block_symmetric_attention(a, b), qk, v, grad)
    expected = _grads(lambda a, b: reference.block_symmetric_attention(a, b), qk, v, grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_empty_and_single_token(device, dtype):
    for shape in [(2, 3, 0, 4), (0, 3, 7, 4), (2, 0, 7, 4)]:
        qk = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
        out = bspf_ext.block_symmetric_attention(qk, torch.zeros(*shape[:3], 5, dtype=dtype, device=device))
        assert out.shape == (*shape[:3], 5)
        out.sum().backward()
        assert qk.grad.shape == shape
        assert bspf_ext.block_mask(qk.detach()).shape == (*shape[:3], shape[2])
    qk, v = inputs(device, 2, 2, 1, 4, dtype=dtype)
    torch.testing.assert_close(bspf_ext.block_symmetric_attention(qk, v), v)


def test_nan_input_does_not_crash(device):
    qk, v = inputs(device, 1, 2, 40, 8, dtype=torch.float32)
    qk[0, 0, 3, 2] = float("nan")
    out = bspf_ext.block_symmetric_attention(qk, v, block_size=8)
    assert out.shape == v.shape
    assert torch.isfinite(out[0, 1]).all()  # the other head is untouched


# -------------------------------------------------------------------------- mask


@pytest.mark.parametrize("n,block_size", [(197, 16), (37, 7), (64, 64), (9, 1), (300, 33)])
@pytest.mark.parametrize("keep_ratio", [0.0, 0.5, 1.0])
def test_block_mask_matches_reference(device, n, block_size, keep_ratio):
    qk, _ = inputs(device, 2, 2, n, 8)
    got = bspf_ext.block_mask(qk, block_size=block_size, keep_ratio=keep_ratio)
    assert got.dtype == torch.bool and got.device == qk.device
    assert torch.equal(got, reference.block_mask(qk, block_size=block_size, keep_ratio=keep_ratio))


def test_mask_properties(device):
    # SPEC §6: M symmetric, diagonal blocks full, each upper block keeps exactly k.
    qk, _ = inputs(device, 2, 3, 197, 16, dtype=torch.float32)
    mask = bspf_ext.block_mask(qk, block_size=16, keep_ratio=0.3).cpu()
    assert torch.equal(mask, mask.transpose(-1, -2))
    for m in range(13):
        for n in range(m, 13):
            block = mask[..., m * 16 : (m + 1) * 16, n * 16 : (n + 1) * 16]
            rows, cols = block.shape[-2:]
            expected = rows * cols if m == n else reference.keep_count(0.3, rows, cols)
            assert (block.sum((-1, -2)) == expected).all()


def test_ties_go_to_the_smaller_index(device):
    # Equal tokens and a centre-only kernel: every score is exactly equal, so each upper
    # block keeps its first k entries in row-major order (k = 64 = four rows of 16).
    qk = torch.ones(1, 1, 48, 4, dtype=torch.float32, device=device)
    centre = torch.zeros(3, 3, dtype=torch.float32, device=device)
    centre[1, 1] = 1.0
    mask = bspf_ext.block_mask(qk, centre, block_size=16, keep_ratio=0.25).cpu()[0, 0]
    for m, n in [(0, 1), (0, 2), (1, 2)]:
        block = mask[m * 16 : (m + 1) * 16, n * 16 : (n + 1) * 16]
        assert block[:4].all() and not block[4:].any()


# ---------------------------------------------------------------------- backward


@pytest.mark.parametrize("n,block_size,keep_ratio", [(197, 16, 0.5), (50, 7, 0.25), (33, 1, 0.5), (130, 64, 1.0)])
@pytest.mark.parametrize("fuse", [True, False])
def test_gradients_match_reference_autograd(device, dtype, n, block_size, keep_ratio, fuse):
    qk, v = inputs(device, 2, 2, n, 12, 6, dtype=dtype)
    grad = torch.randn(2, 2, n, 6, dtype=torch.float64, device=device).to(dtype)
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
def test_gradcheck(device, n, block_size, fuse):
    qk, v = inputs(device, 1, 2, n, 4, 3)
    qk.requires_grad_(), v.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: bspf_ext.block_symmetric_attention(a, b, block_size=block_size, fuse=fuse), (qk, v)
    )


def test_score_kernel_gradient_is_zero(device):
    qk, v = inputs(device, 1, 1, 20, 4)
    w = reference.box_score_kernel(torch.float64, device).requires_grad_()
    bspf_ext.block_symmetric_attention(qk, v, w, block_size=4).sum().backward()
    assert torch.equal(w.grad, torch.zeros(3, 3, dtype=torch.float64, device=device))


# ----------------------------------------------------------- torch integration


def test_opcheck(device, dtype):
    qk, v = inputs(device, 2, 2, 21, 8, 4, dtype=dtype)
    kernel = reference.box_score_kernel(dtype, device)
    args = (qk.requires_grad_(), v.requires_grad_(), kernel, 8, 0.5, True, 0.3)
    torch.library.opcheck(torch.ops.bspf_ext.forward.default, args)
    torch.library.opcheck(torch.ops.bspf_ext.block_mask.default, (qk.detach(), kernel, 8, 0.5, 0.3))
    out, *saved = torch.ops.bspf_ext.forward(qk.detach(), v.detach(), kernel, 8, 0.5, True, 0.3)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.bspf_ext.backward.default, (grad, qk.detach(), v.detach(), *saved, 8, True, 0.3))


def test_bitwise_deterministic(device, dtype):
    qk, v = inputs(device, 4, 3, 197, 16, dtype=dtype)
    grad = torch.randn_like(v)
    runs = [_forward_backward(qk, v, grad) for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------- property


@st.composite
def problems(draw):
    return dict(
        b=draw(st.integers(1, 2)),
        h=draw(st.integers(1, 2)),
        n=draw(st.integers(1, 300)),
        d=draw(st.integers(1, 128)),
        dv=draw(st.integers(1, 16)),
        block_size=draw(st.integers(1, 64)),
        keep_ratio=draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "expanded"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _layout(p, device, dtype):
    b, h, n, d, dv = p["b"], p["h"], p["n"], p["d"], p["dv"]
    if p["layout"] == "transposed":
        qk, v = inputs(device, b, n, h, d, dv, dtype=dtype, seed=p["seed"])
        return qk.transpose(1, 2), v.transpose(1, 2)
    if p["layout"] == "expanded":
        qk, v = inputs(device, 1, h, n, d, dv, dtype=dtype, seed=p["seed"])
        return qk.expand(b, h, n, d), v.expand(b, h, n, dv)
    return inputs(device, b, h, n, d, dv, dtype=dtype, seed=p["seed"])


@pytest.mark.parametrize("working", [torch.float64, torch.float32], ids=["float64", "float32"])
@given(p=problems())
def test_hypothesis_layouts(device, working, p):
    qk, v = _layout(p, device, working)
    assert_close_to_reference(qk, v, block_size=p["block_size"], keep_ratio=p["keep_ratio"])


# ------------------------------------------------------------------ CPU memory


@pytest.mark.parametrize("working", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_cpu_forward_and_backward_at_n_4096(working):
    # The longest sequence docs/design.md gives CPU memory figures for: outputs and
    # gradients against the reference (its float64 autograd at this N needs about 2 GB).
    qk, v = random_inputs(1, 1, 4096, 16, 8, dtype=working, seed=4)
    assert_close_to_reference(qk, v, block_size=16, keep_ratio=0.5)
    grad = torch.randn(1, 1, 4096, 8, dtype=torch.float64).to(working)
    a, b = qk.clone().requires_grad_(), v.clone().requires_grad_()
    got = torch.autograd.grad(bspf_ext.block_symmetric_attention(a, b, block_size=16), (a, b), grad)
    _, mask, match = kernel_choices(qk, v, None, block_size=16, keep_ratio=0.5)
    a64, b64 = qk.double().requires_grad_(), v.double().requires_grad_()
    out64 = reference.block_symmetric_attention(a64, b64, block_size=16, mask=mask, match=match)
    expected = torch.autograd.grad(out64, (a64, b64), grad.double())
    rtol = GRAD_RTOL[working]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=rtol * max(e.abs().max().item(), 1.0))


# ------------------------------------------------------- the CPU forward's direct call


def _forward_op_calls(run) -> int:
    """How many times bspf_ext::forward went through the dispatcher while `run()` ran."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.name().startswith("bspf_ext::forward"):
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        run()
    return Count.calls


def test_direct_cpu_call_is_the_op_bit_for_bit():
    """Eager inference on CPU skips the dispatcher (api._direct_cpu_call), with the saved
    buffers in one scratch allocation (cpu.inference_forward_cpu), and must give what the
    op gives, in every grad mode that allows it; float64, Dv ≠ D, Dv = 0 and empty inputs
    included."""
    from bspf_ext.ops import api
    from bspf_ext.ops.library import forward_op

    for dtype, (b, h, n, d, dv) in [(torch.float32, (2, 3, 70, 16, 16)), (torch.float64, (1, 2, 33, 8, 5)),
                                    (torch.float32, (1, 1, 1, 4, 4)), (torch.float32, (1, 2, 20, 4, 0)),
                                    (torch.float32, (0, 2, 20, 4, 4)), (torch.float64, (1, 2, 0, 4, 4))]:
        qk, v = random_inputs(b, h, n, d, max(dv, 1), dtype=dtype, seed=5)
        v = v[..., :dv]
        kernel = torch.rand(3, 3, dtype=dtype)
        through_op = forward_op(qk, v, kernel, 16, 0.5, True, 0.25)[0]
        for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
            with mode():
                assert api._direct_cpu_call(qk, v, kernel)
                out = bspf_ext.block_symmetric_attention(qk, v, kernel, block_size=16, keep_ratio=0.5, scale=0.25)
            assert out.shape == through_op.shape and out.dtype == dtype
            assert torch.equal(out, through_op)


def test_direct_cpu_call_steps_aside_when_the_dispatcher_is_watched():
    """Autograd, a dispatch mode (a FLOP counter, a tracer), the profiler and torch.compile
    see the op: the direct call is only for plain eager inference."""
    from bspf_ext.ops import api

    qk, v = random_inputs(1, 2, 40, 8, dtype=torch.float32, seed=6)
    kernel = torch.full((3, 3), 1 / 9)
    assert _forward_op_calls(lambda: bspf_ext.block_symmetric_attention(qk, v)) == 1
    with torch.autograd.profiler.profile() as prof:
        bspf_ext.block_symmetric_attention(qk, v)
    assert any(e.name.startswith("bspf_ext::forward") for e in prof.function_events)
    assert not api._direct_cpu_call(qk.clone().requires_grad_(), v, kernel)
    assert not api._direct_cpu_call(qk.to("meta"), v.to("meta"), kernel.to("meta"))
    with torch.no_grad():
        assert api._direct_cpu_call(qk.clone().requires_grad_(), v, kernel)
