"""CUDA kernels of the bspf_ext ops: allocate through torch on the tensor's device, fill
the params struct, launch bspf_ext._cuda on the current stream under a device guard.
Imported only when the package was built with CUDA (see ops/__init__.py)."""

from __future__ import annotations

import torch

from .. import _cuda
from . import backends
from . import params as _params
from .geometry import accumulation_dtype, num_chunks
from .library import (allocate_forward, backward_op, block_mask_op, forward_op, score_kernel_grad_op,
                      unpack_mask_words)
from .validation import check_score_kernel_grad_inputs


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@forward_op.register_kernel("cuda")
def _forward_cuda(qk, v, score_kernel, block_size, keep_ratio, fuse, scale):
    backends.check_cuda_driver()
    outputs = allocate_forward(qk, v, block_size)
    out, mask_words, match, rho, lse, log_row_sum = outputs
    if mask_words.numel() == 0:  # B·H = 0 or N = 0
        return tuple(t.zero_() for t in outputs)
    with torch.cuda.device(qk.device):
        weights = _params.score_kernel_buffer(score_kernel, qk.dtype)
        saved = _params.saved(_cuda, mask_words, match, rho, lse, log_row_sum)
        params = _params.forward_params(_cuda, qk, v, weights, block_size, keep_ratio, fuse, scale, out, saved, 0)
        _cuda.forward(params, qk.device.index, _stream(qk.device))
    return outputs


@backward_op.register_kernel("cuda")
def _backward_cuda(grad_out, qk, v, mask_words, match, rho, lse, log_row_sum, block_size, fuse, scale):
    backends.check_cuda_driver()
    acc = accumulation_dtype(qk.dtype)
    with torch.cuda.device(qk.device):
        # The kernels accumulate each token's gradient in the accumulation type, then cast;
        # where the dtypes agree the output is the accumulator.
        grad_qk_acc = torch.zeros(qk.shape, dtype=acc, device=qk.device)
        grad_v_acc = torch.zeros(v.shape, dtype=acc, device=v.device)
        grad_qk = grad_qk_acc if qk.dtype == acc else torch.empty(qk.shape, dtype=qk.dtype, device=qk.device)
        grad_v = grad_v_acc if v.dtype == acc else torch.empty(v.shape, dtype=v.dtype, device=v.device)
        if mask_words.numel() == 0:
            return grad_qk.zero_(), grad_v.zero_()
        b, h, n, _ = qk.shape
        row_stats = torch.empty((3, b, h, n), dtype=acc, device=qk.device)
        workspace = _cuda.BackwardWorkspace()
        workspace.row_stats = row_stats.data_ptr()
        workspace.grad_qk_acc = grad_qk_acc.data_ptr()
        workspace.grad_v_acc = grad_v_acc.data_ptr()
        saved = _params.saved(_cuda, mask_words, match, rho, lse, log_row_sum)
        params = _params.backward_params(_cuda, grad_out, qk, v, saved, block_size, fuse, scale, grad_qk, grad_v, 0)
        _cuda.backward(params, workspace, qk.device.index, _stream(qk.device))
    return grad_qk, grad_v


@block_mask_op.register_kernel("cuda")
def _block_mask_cuda(qk, score_kernel, block_size, keep_ratio, scale):
    backends.check_cuda_driver()
    b, h, n, _ = qk.shape
    mask_words = torch.empty((b, h, n, num_chunks(n, block_size)), dtype=torch.int64, device=qk.device)
    if mask_words.numel() == 0:
        return torch.empty((b, h, n, n), dtype=torch.bool, device=qk.device)
    with torch.cuda.device(qk.device):
        weights = _params.score_kernel_buffer(score_kernel, qk.dtype)
        saved = _cuda.Saved()
        saved.mask_words = mask_words.data_ptr()
        # v is not read by the mask kernel; qk stands in so the struct is well formed.
        params = _params.forward_params(_cuda, qk, qk, weights, block_size, keep_ratio, True, scale, None, saved, 0)
        _cuda.mask(params, qk.device.index, _stream(qk.device))
    return unpack_mask_words(mask_words, n, block_size)


@score_kernel_grad_op.register_kernel("cuda")
def _score_kernel_grad_cuda(grad_out, qk, v, score_kernel, mask_words, match, rho, lse, log_row_sum, block_size,
                            keep_ratio, fuse, scale):
    check_score_kernel_grad_inputs(grad_out, qk, v, score_kernel)
    backends.check_cuda_driver()
    b, h = qk.shape[:2]
    with torch.cuda.device(qk.device):
        grad = torch.empty((3, 3), dtype=accumulation_dtype(qk.dtype), device=qk.device)
        partials = torch.empty((b * h, 9), dtype=torch.float64, device=qk.device)  # each pair's share
        weights = _params.score_kernel_buffer(score_kernel, qk.dtype)
        saved = _params.saved(_cuda, mask_words, match, rho, lse, log_row_sum)
        params = _params.score_kernel_grad_params(
            _cuda, grad_out, qk, v, weights, saved, block_size, keep_ratio, fuse, scale, grad, 0
        )
        _cuda.score_kernel_grad(params, partials.data_ptr(), qk.device.index, _stream(qk.device))
    return grad.to(score_kernel.dtype)
