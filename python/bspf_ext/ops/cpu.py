"""CPU kernels of the bspf_ext ops: allocate through torch, fill the params struct,
call bspf_ext._C with torch's thread count."""

from __future__ import annotations

import math

import torch

from .. import _C
from . import params as _params
from .validation import check_score_kernel_grad_inputs
from .geometry import accumulation_dtype, num_chunks
from .library import (allocate_forward, backward_op, block_mask_op, forward_op, saved_layout, score_kernel_grad_op,
                      unpack_mask_words)


@forward_op.register_kernel("cpu")
def forward_cpu(qk, v, score_kernel, block_size, keep_ratio, fuse, scale):
    outputs = allocate_forward(qk, v, block_size)
    out, mask_words, match, rho, lse, log_row_sum = outputs
    if mask_words.numel() == 0:  # B·H = 0 or N = 0
        return tuple(t.zero_() for t in outputs)
    saved = _params.saved(_C, mask_words, match, rho, lse, log_row_sum)
    _run_forward(qk, v, score_kernel, block_size, keep_ratio, fuse, scale, out, saved)
    return outputs


def inference_forward_cpu(qk, v, score_kernel, block_size, keep_ratio, fuse, scale):
    """bspf_ext::forward's output alone, for a call that nothing will differentiate (api.py
    calls it directly): what the forward saves for a backward goes to one scratch buffer,
    dropped on return. One allocation instead of five: each costs microseconds right after
    the previous call's kernel, a few % of a batch-1 call."""
    b, h, n, _ = qk.shape
    out = qk.new_empty((b, h, n, v.shape[-1]))
    rows = b * h * n
    if rows == 0:
        return out
    # The saved buffers one after another, each starting on a 64-byte line.
    offsets, size = [], 0
    for shape, dtype in saved_layout(qk, block_size):
        offsets.append(size)
        size += -(-dtype.itemsize * math.prod(shape) // 64) * 64
    scratch = torch.empty(size + 64, dtype=torch.uint8)
    base = -(-scratch.data_ptr() // 64) * 64
    saved = _C.Saved(*(base + offset for offset in offsets))
    _run_forward(qk, v, score_kernel, block_size, keep_ratio, fuse, scale, out, saved)
    return out


def _run_forward(qk, v, score_kernel, block_size, keep_ratio, fuse, scale, out, saved):
    weights = _params.score_kernel_buffer(score_kernel, qk.dtype)
    params = _params.forward_params(
        _C, qk, v, weights, block_size, keep_ratio, fuse, scale, out, saved, torch.get_num_threads()
    )
    _C.forward(params)


@backward_op.register_kernel("cpu")
def _backward_cpu(grad_out, qk, v, mask_words, match, rho, lse, log_row_sum, block_size, fuse, scale):
    grad_qk = torch.empty(qk.shape, dtype=qk.dtype)
    grad_v = torch.empty(v.shape, dtype=v.dtype)
    if mask_words.numel() == 0:
        return grad_qk.zero_(), grad_v.zero_()
    saved = _params.saved(_C, mask_words, match, rho, lse, log_row_sum)
    params = _params.backward_params(
        _C, grad_out, qk, v, saved, block_size, fuse, scale, grad_qk, grad_v, torch.get_num_threads()
    )
    _C.backward(params)
    return grad_qk, grad_v


@block_mask_op.register_kernel("cpu")
def _block_mask_cpu(qk, score_kernel, block_size, keep_ratio, scale):
    b, h, n, _ = qk.shape
    mask_words = torch.empty((b, h, n, num_chunks(n, block_size)), dtype=torch.int64)
    if mask_words.numel() == 0:
        return torch.empty((b, h, n, n), dtype=torch.bool)
    weights = _params.score_kernel_buffer(score_kernel, qk.dtype)
    saved = _C.Saved()
    saved.mask_words = mask_words.data_ptr()
    # v is not read by the mask kernel; qk stands in so the struct is well formed.
    params = _params.forward_params(
        _C, qk, qk, weights, block_size, keep_ratio, True, scale, None, saved, torch.get_num_threads()
    )
    _C.mask(params)
    return unpack_mask_words(mask_words, n, block_size)


@score_kernel_grad_op.register_kernel("cpu")
def _score_kernel_grad_cpu(grad_out, qk, v, score_kernel, mask_words, match, rho, lse, log_row_sum, block_size,
                           keep_ratio, fuse, scale):
    check_score_kernel_grad_inputs(grad_out, qk, v, score_kernel)
    grad = torch.empty((3, 3), dtype=accumulation_dtype(qk.dtype))
    weights = _params.score_kernel_buffer(score_kernel, qk.dtype)
    saved = _params.saved(_C, mask_words, match, rho, lse, log_row_sum)
    params = _params.score_kernel_grad_params(
        _C, grad_out, qk, v, weights, saved, block_size, keep_ratio, fuse, scale, grad, torch.get_num_threads()
    )
    _C.score_kernel_grad(params)  # zeros for an empty problem
    return grad.to(score_kernel.dtype)
