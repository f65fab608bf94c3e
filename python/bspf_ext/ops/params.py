"""Fills the kernels' POD params structs from torch tensors.

`backend` is a compiled module (`_C` or `_cuda`); both bind the same structs. Pointers
cross as integers, strides as element counts, so the kernels never see torch.
"""

from __future__ import annotations

import torch

from .geometry import DTYPE_NAMES, accumulation_dtype


def score_kernel_buffer(score_kernel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 3×3 score kernel as the kernels read it: contiguous, in the accumulation type."""
    acc = accumulation_dtype(dtype)
    if score_kernel.dtype == acc and score_kernel.is_contiguous():
        return score_kernel  # the common case, without two no-op dispatches
    return score_kernel.to(acc).contiguous()


def problem(backend, qk: torch.Tensor, v: torch.Tensor, block_size: int, scale: float, fuse: bool):
    p = backend.Problem()
    p.dtype = getattr(backend.DType, DTYPE_NAMES[qk.dtype])
    p.batch, p.heads, p.seqlen, p.head_dim = qk.shape
    p.value_dim = v.shape[-1]
    p.block_size = block_size
    p.scale = scale
    p.fuse = fuse
    return p


def saved(backend, mask_words, match, rho, lse, log_row_sum):
    s = backend.Saved()
    s.mask_words = mask_words.data_ptr()
    s.match = match.data_ptr()
    s.rho = rho.data_ptr()
    s.lse = lse.data_ptr()
    s.log_row_sum = log_row_sum.data_ptr()
    return s


def forward_params(backend, qk, v, score_weights, block_size, keep_ratio, fuse, scale, out, saved_struct, threads):
    fp = backend.ForwardParams()
    fp.p = problem(backend, qk, v, block_size, scale, fuse)
    fp.keep_ratio = keep_ratio
    fp.qk, fp.qk_stride = qk.data_ptr(), list(qk.stride())
    fp.v, fp.v_stride = v.data_ptr(), list(v.stride())
    fp.score_kernel = score_weights.data_ptr()
    fp.out = 0 if out is None else out.data_ptr()
    fp.saved = saved_struct
    fp.num_threads = threads
    return fp


def backward_params(backend, grad_out, qk, v, saved_struct, block_size, fuse, scale, grad_qk, grad_v, threads):
    bp = backend.BackwardParams()
    bp.p = problem(backend, qk, v, block_size, scale, fuse)
    bp.grad_out, bp.grad_out_stride = grad_out.data_ptr(), list(grad_out.stride())
    bp.qk, bp.qk_stride = qk.data_ptr(), list(qk.stride())
    bp.v, bp.v_stride = v.data_ptr(), list(v.stride())
    bp.saved = saved_struct
    bp.grad_qk = grad_qk.data_ptr()
    bp.grad_v = grad_v.data_ptr()
    bp.num_threads = threads
    return bp


def score_kernel_grad_params(backend, grad_out, qk, v, score_weights, saved_struct, block_size, keep_ratio, fuse,
                             scale, grad_score_kernel, threads):
    sp = backend.ScoreKernelGradParams()
    sp.p = problem(backend, qk, v, block_size, scale, fuse)
    sp.keep_ratio = keep_ratio
    sp.grad_out, sp.grad_out_stride = grad_out.data_ptr(), list(grad_out.stride())
    sp.qk, sp.qk_stride = qk.data_ptr(), list(qk.stride())
    sp.v, sp.v_stride = v.data_ptr(), list(v.stride())
    sp.score_kernel = score_weights.data_ptr()
    sp.saved = saved_struct
    sp.grad_score_kernel = grad_score_kernel.data_ptr()
    sp.num_threads = threads
    return sp
