"""The emulated CUDA entry points on CPU tensors, as bspf_ext._cuda_ops calls the real
ones: the params structs come from bspf_ext._params, device 0, stream 0 (host memory is
the emulated device's memory). Every output is pre-filled with garbage (NaN, or all
bits set) so that an entry a kernel forgets to write shows."""

from __future__ import annotations

from typing import NamedTuple

import torch

from bspf_ext import reference
from bspf_ext.ops import params as _params
from bspf_ext.ops.geometry import accumulation_dtype, num_chunks
from bspf_ext.ops.library import unpack_mask_words

__all__ = ["Forward", "forward", "backward", "score_kernel_grad", "mask_words", "block_mask", "forward_mask", "unpack_mask_words"]

DEVICE, STREAM = 0, 0


class Forward(NamedTuple):
    out: torch.Tensor
    mask_words: torch.Tensor
    match: torch.Tensor
    rho: torch.Tensor
    lse: torch.Tensor
    log_row_sum: torch.Tensor


def garbage(shape, dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.full(shape, -1, dtype=dtype)  # every bit set


def _scale(qk, scale):
    return qk.shape[-1] ** -0.5 if scale is None else scale


def _kernel(qk, score_kernel):
    return _params.score_kernel_buffer(reference.box_score_kernel(qk.dtype) if score_kernel is None else score_kernel, qk.dtype)


def forward(cuda, qk, v, score_kernel=None, *, block_size, keep_ratio, fuse=True, scale=None) -> Forward:
    b, h, n, _ = qk.shape
    acc = accumulation_dtype(qk.dtype)
    chunks = num_chunks(n, block_size)
    result = Forward(
        garbage((b, h, n, v.shape[-1]), qk.dtype),
        garbage((b, h, n, chunks), torch.int64),
        garbage((b, h, n), torch.int32),
        *(garbage((b, h, n), acc) for _ in range(3)),
    )
    kernel = _kernel(qk, score_kernel)
    saved = _params.saved(cuda, *result[1:])
    params = _params.forward_params(cuda, qk, v, kernel, block_size, keep_ratio, fuse, _scale(qk, scale), result.out,
                                    saved, 0)
    cuda.forward(params, DEVICE, STREAM)
    return result


def backward(cuda, grad_out, qk, v, fwd: Forward, *, block_size, fuse=True, scale=None):
    """(grad_qk, grad_v) from the saved buffers of `fwd`."""
    acc = accumulation_dtype(qk.dtype)
    # The accumulators are zeroed by the caller (bspf/cuda.h); the rest is garbage.
    grad_qk_acc = torch.zeros(qk.shape, dtype=acc)
    grad_v_acc = torch.zeros(v.shape, dtype=acc)
    grad_qk = grad_qk_acc if qk.dtype == acc else garbage(qk.shape, qk.dtype)
    grad_v = grad_v_acc if v.dtype == acc else garbage(v.shape, v.dtype)
    b, h, n, _ = qk.shape
    row_stats = garbage((3, b, h, n), acc)
    workspace = cuda.BackwardWorkspace()
    workspace.row_stats = row_stats.data_ptr()
    workspace.grad_qk_acc = grad_qk_acc.data_ptr()
    workspace.grad_v_acc = grad_v_acc.data_ptr()
    saved = _params.saved(cuda, *fwd[1:])
    params = _params.backward_params(cuda, grad_out, qk, v, saved, block_size, fuse, _scale(qk, scale), grad_qk,
                                     grad_v, 0)
    cuda.backward(params, workspace, DEVICE, STREAM)
    return grad_qk, grad_v


def score_kernel_grad(cuda, grad_out, qk, v, score_kernel, fwd: Forward, *, block_size, keep_ratio, fuse=True,
                      scale=None) -> torch.Tensor:
    """The (3, 3) surrogate gradient of the score kernel (accumulation type) from the saved
    buffers of `fwd`."""
    b, h = qk.shape[:2]
    grad = garbage((3, 3), accumulation_dtype(qk.dtype))
    partials = garbage((b * h, 9), torch.float64)
    kernel = _kernel(qk, score_kernel)
    saved = _params.saved(cuda, *fwd[1:])
    params = _params.score_kernel_grad_params(cuda, grad_out, qk, v, kernel, saved, block_size, keep_ratio, fuse,
                                              _scale(qk, scale), grad, 0)
    cuda.score_kernel_grad(params, partials.data_ptr(), DEVICE, STREAM)
    return grad


def mask_words(cuda, qk, score_kernel=None, *, block_size, keep_ratio, scale=None) -> torch.Tensor:
    """The (B, H, N, C) words the emulated block-mask entry point writes."""
    b, h, n, _ = qk.shape
    words = garbage((b, h, n, num_chunks(n, block_size)), torch.int64)
    saved = cuda.Saved()
    saved.mask_words = words.data_ptr()
    kernel = _kernel(qk, score_kernel)  # a local: the params hold only its address
    # v is not read for the mask; qk stands in so the struct is well formed (as _cuda_ops does).
    params = _params.forward_params(cuda, qk, qk, kernel, block_size, keep_ratio, True, _scale(qk, scale), None,
                                    saved, 0)
    cuda.mask(params, DEVICE, STREAM)
    return words


def block_mask(cuda, qk, score_kernel=None, *, block_size, keep_ratio, scale=None) -> torch.Tensor:
    words = mask_words(cuda, qk, score_kernel, block_size=block_size, keep_ratio=keep_ratio, scale=scale)
    return unpack_mask_words(words, qk.shape[-2], block_size)


def forward_mask(fwd: Forward, n: int, block_size: int) -> torch.Tensor:
    return unpack_mask_words(fwd.mask_words, n, block_size)
