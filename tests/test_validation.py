"""Bad input raises a clear ValueError/TypeError naming the argument (never a crash)."""

import math

import pytest
import torch

import bspf_ext


def ok():
    return torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 3)


def call(qk=None, v=None, **kwargs):
    a, b = ok()
    return bspf_ext.block_symmetric_attention(a if qk is None else qk, b if v is None else v, **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(qk=torch.randn(2, 10, 4)), ValueError, "qk must have shape"),
        (dict(v=torch.randn(2, 10, 3)), ValueError, "v must have shape"),
        (dict(v=torch.randn(1, 2, 11, 3)), ValueError, r"v must have shape \(B, H, N, Dv\)"),
        (dict(v=torch.randn(1, 3, 10, 3)), ValueError, "v must have shape"),
        (dict(qk=[[1.0]]), TypeError, "qk must be a torch.Tensor"),
        (dict(qk=torch.ones(1, 2, 10, 4, dtype=torch.int64)), TypeError, "qk must be a floating-point"),
        (dict(v=torch.ones(1, 2, 10, 3, dtype=torch.int32)), TypeError, "v must be a floating-point"),
        (dict(v=torch.randn(1, 2, 10, 3, dtype=torch.float64)), TypeError, "v must have the dtype of qk"),
        (dict(qk=torch.randn(1, 2, 10, 0)), ValueError, "head dimension"),
        (dict(block_size=0), ValueError, "block_size must be an int in"),
        (dict(block_size=65), ValueError, "block_size must be an int in"),
        (dict(block_size=16.0), TypeError, "block_size must be an int"),
        (dict(block_size=True), TypeError, "block_size must be an int"),
        (dict(keep_ratio=-0.1), ValueError, "keep_ratio must be a float in"),
        (dict(keep_ratio=1.5), ValueError, "keep_ratio must be a float in"),
        (dict(keep_ratio=math.nan), ValueError, "keep_ratio"),
        (dict(keep_ratio="half"), TypeError, "keep_ratio"),
        (dict(scale=math.inf), ValueError, "scale must be a finite"),
        (dict(scale="1"), TypeError, "scale"),
        (dict(fuse=1), TypeError, "fuse must be a bool"),
        (dict(score_kernel=torch.ones(2, 2)), ValueError, r"score_kernel must have shape \(3, 3\)"),
        (dict(score_kernel=torch.ones(3, 3, dtype=torch.float64)), TypeError, "score_kernel must have the dtype"),
        (dict(score_kernel=[[1.0] * 3] * 3), TypeError, "score_kernel must be"),
        (dict(qk=torch.randn(1, 2, 10, 4, dtype=torch.float16), v=torch.randn(1, 2, 10, 3, dtype=torch.float16)),
         TypeError, "float32 or float64"),
        (dict(qk=torch.randn(1, 2, 10, 4, device="meta"), v=torch.randn(1, 2, 10, 3, device="meta")),
         ValueError, "cpu or cuda device"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        call(**kwargs)


def test_device_mismatch_is_named():
    qk, v = ok()
    with pytest.raises(ValueError, match="v must be on the device of qk"):
        bspf_ext.block_symmetric_attention(qk, v.to("meta"))


def test_block_mask_validates_too():
    with pytest.raises(ValueError, match="block_size"):
        bspf_ext.block_mask(torch.randn(1, 1, 4, 2), block_size=100)
    with pytest.raises(ValueError, match="qk must have shape"):
        bspf_ext.block_mask(torch.randn(4, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a GPU")
def test_cuda_tensor_gives_a_clear_error_without_gpu():
    if bspf_ext.has_cuda_build():
        pytest.skip("the CUDA module is built; CUDA tensors cannot be made without a GPU")
    # A CUDA tensor cannot be created here; the backend check is what a CUDA tensor reaches.
    from bspf_ext import _backends

    with pytest.raises(RuntimeError, match="built without CUDA"):
        _backends.require_cuda(torch.empty(0))
