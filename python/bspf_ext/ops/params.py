"""Fills the kernels' POD params structs from torch tensors.

`backend` is a compiled module (`_C` or `_cuda`); both bind the same structs. Pointers
cross as integers, strides as element counts, so the kernels never see torch. The
forward's and backward's structs are built by their all-fields constructors, one call
into the extension each rather than one per field: this runs on every op call, right
after the previous kernel has taken the caches, where each such call is slow.
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
    b, h, n, d = qk.shape
    return backend.Problem(getattr(backend.DType, DTYPE_NAMES[qk.dtype]), b, h, n, d, v.shape[-1], block_size, scale,
                           fuse)


def saved(backend, mask_words, match, rho, lse, log_row_sum):
    return backend.Saved(mask_words.data_ptr(), match.data_ptr(), rho.data_ptr(), lse.data_ptr(),
                         log_row_sum.data_ptr())


def forward_params(backend, qk, v, score_weights, block_size, keep_ratio, fuse, scale, out, saved_struct, threads):
    return backend.ForwardParams(
        problem(backend, qk, v, block_size, scale, fuse), keep_ratio, qk.data_ptr(), qk.stride(), v.data_ptr(),
        v.stride(), score_weights.data_ptr(), 0 if out is None else out.data_ptr(), saved_struct, threads,
    )


def backward_params(backend, grad_out, qk, v, saved_struct, block_size, fuse, scale, grad_qk, grad_v, threads):
    return backend.BackwardParams(
        problem(backend, qk, v, block_size, scale, fuse), grad_out.data_ptr(), grad_out.stride(), qk.data_ptr(),
        qk.stride(), v.data_ptr(), v.stride(), saved_struct, grad_qk.data_ptr(), grad_v.data_ptr(), threads,
    )


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
