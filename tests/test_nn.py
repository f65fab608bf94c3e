"""The attention layers: BlockSymmetricAttention against the reference and the dense/chunk
limits, gradients, autocast, torch.compile, state_dict, bad arguments."""

import io

import pytest
import torch
import torch.nn.functional as F

import bspf_ext
from bspf_ext import reference
from bspf_ext.nn import BlockSymmetricAttention, ChunkAttention, DenseAttention, score_kernel_from_theta

DIM, HEADS = 32, 4


def _inputs(b=2, n=23, dim=DIM, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, dim, generator=g, dtype=dtype)


def _layer(seed=0, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    options = dict(block_size=4, qkv_bias=True)
    options.update(kwargs)
    return BlockSymmetricAttention(DIM, HEADS, **options).to(dtype)


def _heads(t, b, n):
    return t.reshape(b, n, HEADS, DIM // HEADS).transpose(1, 2)


def _merge(t):
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


@pytest.mark.parametrize("cls", [BlockSymmetricAttention, DenseAttention, ChunkAttention])
@pytest.mark.parametrize("n", [1, 16, 23])
def test_shapes(cls, n):
    x = _inputs(n=n, dtype=torch.float32)
    assert cls(DIM, HEADS)(x).shape == (2, n, DIM)


def test_keep_ratio_one_is_dense_shared_qk_attention():
    layer = _layer(keep_ratio=1.0)
    x = _inputs()
    b, n, _ = x.shape
    qk, v = _heads(layer.qk(x), b, n), _heads(layer.v(x), b, n)
    expected = layer.proj(_merge(F.scaled_dot_product_attention(qk, qk, v)))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_keep_ratio_zero_is_chunk_attention_with_tied_q_and_k():
    layer = _layer(keep_ratio=0.0)
    chunk = ChunkAttention(DIM, HEADS, block_size=4, qkv_bias=True).double()
    with torch.no_grad():
        chunk.qkv.weight.copy_(torch.cat([layer.qk.weight, layer.qk.weight, layer.v.weight]))
        chunk.qkv.bias.copy_(torch.cat([layer.qk.bias, layer.qk.bias, layer.v.bias]))
        chunk.proj.load_state_dict(layer.proj.state_dict())
    x = _inputs()
    torch.testing.assert_close(layer(x), chunk(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(fuse=False), dict(scoring="center"), dict(scoring="box"), dict(keep_ratio=0.3, block_size=7)],
)
def test_layer_matches_reference_operator(options):
    layer = _layer(**options)
    if layer.theta is not None:
        with torch.no_grad():
            layer.theta.copy_(torch.randn(3, 3, dtype=torch.float64))
    x = _inputs(n=29)
    b, n, _ = x.shape
    qk, v = _heads(layer.qk(x), b, n), _heads(layer.v(x), b, n)
    attn = reference.block_symmetric_attention(
        qk,
        v,
        layer.score_kernel(torch.float64, x.device),
        block_size=layer.block_size,
        keep_ratio=layer.keep_ratio,
        fuse=layer.fuse,
    )
    torch.testing.assert_close(layer(x), layer.proj(_merge(attn)), rtol=1e-10, atol=1e-10)


def test_score_kernels():
    torch.testing.assert_close(score_kernel_from_theta(torch.zeros(3, 3)), reference.box_score_kernel())
    w = score_kernel_from_theta(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    torch.testing.assert_close(w, w.T)
    center = _layer(scoring="center").score_kernel(torch.float32, torch.device("cpu"))
    assert center[1, 1] == 1 and center.sum() == 1


def test_theta_moves_the_mask():
    """θ reaches the operator: a kernel concentrated off-center keeps a different mask."""
    layer = _layer(keep_ratio=0.3)
    x = _inputs(n=32)
    before = layer(x)
    with torch.no_grad():
        layer.theta[0, 2] = 8.0
    assert not torch.allclose(layer(x), before)


def test_score_kernel_is_reused_only_while_theta_is_unchanged():
    """Outside autograd W is made once and reused; every way of changing θ (in place, a
    loaded state dict, a dtype change) makes it anew, and with autograd on it is made
    afresh, with its graph, on every call."""
    layer = _layer(dtype=torch.float32)
    cpu = torch.device("cpu")

    def fresh():
        return score_kernel_from_theta(layer.theta.detach().float())

    with torch.no_grad():
        first = layer.score_kernel(torch.float32, cpu)
        assert layer.score_kernel(torch.float32, cpu) is first
        layer.theta[0, 1] = 2.0
        moved = layer.score_kernel(torch.float32, cpu)
        torch.testing.assert_close(moved, fresh())
        assert not torch.equal(moved, first)
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        state["theta"][1, 1] = -3.0
        layer.load_state_dict(state)
        torch.testing.assert_close(layer.score_kernel(torch.float32, cpu), fresh())
        assert layer.score_kernel(torch.float64, cpu).dtype == torch.float64
    layer.double()
    with torch.no_grad():
        torch.testing.assert_close(layer.score_kernel(torch.float64, cpu), fresh().double())
    w = layer.score_kernel(torch.float64, cpu)
    assert w.grad_fn is not None and layer.score_kernel(torch.float64, cpu) is not w
    with torch.inference_mode():
        torch.testing.assert_close(layer.score_kernel(torch.float64, cpu), fresh().double())


def test_gradients_reach_every_learning_parameter():
    layer = _layer(keep_ratio=0.5, qk_norm=True, norm_layer=torch.nn.LayerNorm, dtype=torch.float32)
    with torch.no_grad():  # LayerNorm's affine parameters start at 1 and 0; make them generic
        for p in layer.qk_norm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layer(_inputs(dtype=torch.float32)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name  # θ: the surrogate (spec §4a)


def test_theta_learns_through_the_surrogate_and_nothing_else():
    layer = _layer(dtype=torch.float64)
    with torch.no_grad():
        layer.theta.copy_(torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    x = _inputs(dtype=torch.float64)
    grad = torch.randn(x.shape, dtype=torch.float64)
    (layer(x) * grad).sum().backward()
    # The same step through the reference's surrogate, from the layer's own q/k and values.
    qk = layer.shared_qk(x).detach()
    b, n, c = x.shape
    v = layer.v(x).reshape(b, n, layer.num_heads, layer.head_dim).transpose(1, 2).detach()
    theta = layer.theta.detach().clone().requires_grad_()
    out = reference.block_symmetric_attention(
        qk, v, score_kernel_from_theta(theta).double(), block_size=layer.block_size,
        keep_ratio=layer.keep_ratio, scale=layer.scale, score_kernel_grad="surrogate",
    )
    upstream = torch.autograd.grad((layer.proj(out.transpose(1, 2).reshape(b, n, c)) * grad).sum(), out)[0]
    (expected,) = torch.autograd.grad(out, theta, upstream)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(layer.theta.grad, expected, rtol=1e-6, atol=1e-9)


def test_cpu_autocast_bfloat16():
    layer = _layer(dtype=torch.float32, keep_ratio=1.0)
    x = _inputs(dtype=torch.float32)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    # keep_ratio 1 has no discrete choices, so the only difference is bf16 rounding.
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_cpu_autocast_pruned_runs_and_backpropagates():
    layer = _layer(dtype=torch.float32, keep_ratio=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(_inputs(dtype=torch.float32))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert layer.qk.weight.grad.dtype == torch.float32 and torch.isfinite(layer.qk.weight.grad).all()


def test_bfloat16_module_on_cpu_computes_in_float32():
    layer = _layer(dtype=torch.bfloat16, keep_ratio=1.0)
    out = layer(_inputs(dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_torch_compile_fullgraph_forward_and_backward():
    layer = _layer(dtype=torch.float32)
    x = _inputs(dtype=torch.float32)
    expected = layer(x)
    expected.sum().backward()
    expected_grad = layer.qk.weight.grad.clone()
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.qk.weight.grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scoring", ["learned", "center"])
def test_state_dict_round_trip(scoring):
    layer = _layer(seed=0, scoring=scoring, keep_ratio=0.4)
    if scoring == "learned":
        with torch.no_grad():
            layer.theta.copy_(torch.randn(3, 3, dtype=torch.float64))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = _layer(seed=1, scoring=scoring, keep_ratio=0.4)
    fresh.load_state_dict(torch.load(buffer))
    x = _inputs()
    assert torch.equal(fresh(x), layer(x))
    assert ("theta" in layer.state_dict()) == (scoring == "learned")


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(attn_drop=0.1), ValueError),
        (dict(scoring="median"), ValueError),
        (dict(keep_ratio=1.5), ValueError),
        (dict(block_size=65), ValueError),
        (dict(fuse=1), TypeError),
        (dict(qk_norm=True), ValueError),  # no norm_layer
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        BlockSymmetricAttention(DIM, HEADS, **kwargs)


def test_bad_shapes_and_masks():
    with pytest.raises(ValueError, match="divisible"):
        BlockSymmetricAttention(30, 4)
    layer = BlockSymmetricAttention(DIM, HEADS)
    with pytest.raises(ValueError, match="attn_mask"):
        layer(_inputs(dtype=torch.float32), attn_mask=torch.ones(23, 23, dtype=torch.bool))


def test_drop_in_accepts_attn_drop_zero_and_proj_drop():
    layer = BlockSymmetricAttention(DIM, HEADS, attn_drop=0.0, proj_drop=0.5).train()
    assert layer(_inputs(dtype=torch.float32)).shape == (2, 23, DIM)


def test_public_name():
    assert bspf_ext.BlockSymmetricAttention is BlockSymmetricAttention


needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and bspf_ext.has_cuda_build()), reason="needs a GPU and the CUDA build"
)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_passes_through(dtype):
    layer = _layer(dtype=torch.float32, keep_ratio=1.0).cuda()
    x = _inputs(dtype=torch.float32).cuda()
    expected = layer(x)
    with torch.autocast("cuda", dtype=dtype):
        out = layer(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)
    out.float().sum().backward()
    assert torch.isfinite(layer.qk.weight.grad).all()


@pytest.mark.cuda
@needs_cuda
def test_cuda_matches_cpu():
    x = _inputs(dtype=torch.float64, n=40)
    layer64 = _layer(dtype=torch.float64, keep_ratio=0.5)
    expected = layer64(x)
    torch.testing.assert_close(layer64.cuda()(x.cuda()).cpu(), expected, rtol=1e-10, atol=1e-10)
