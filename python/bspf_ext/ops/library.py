"""The BSPF operator registered with torch.library: the custom ops, their fake (meta)
implementations and autograd. The device kernels register themselves from cpu.py and,
when the package was built with CUDA, cuda.py; the public functions are in api.py.

Four ops:
  bspf_ext::forward   -> (out, mask_words, match, rho, lse, log_row_sum); the last five are
                         the discrete choices and row statistics saved for the backward
  bspf_ext::backward  -> (grad_qk, grad_v), its own op so compile/opcheck/graphs compose
  bspf_ext::block_mask -> the boolean keep mask
  bspf_ext::score_kernel_grad -> the (3, 3) surrogate gradient of the score kernel
                         (docs/spec.md §4a), from the backward's inputs; used by
                         score_kernel_grad="surrogate" (api.py)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .geometry import accumulation_dtype, num_chunks


# ---------------------------------------------------------------------------- ops


@torch.library.custom_op("bspf_ext::forward", mutates_args=(), device_types=())
def forward_op(
    qk: Tensor, v: Tensor, score_kernel: Tensor, block_size: int, keep_ratio: float, fuse: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    raise NotImplementedError(f"bspf_ext::forward has no kernel for device {qk.device}")


@torch.library.custom_op("bspf_ext::backward", mutates_args=(), device_types=())
def backward_op(
    grad_out: Tensor,
    qk: Tensor,
    v: Tensor,
    mask_words: Tensor,
    match: Tensor,
    rho: Tensor,
    lse: Tensor,
    log_row_sum: Tensor,
    block_size: int,
    fuse: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    raise NotImplementedError(f"bspf_ext::backward has no kernel for device {qk.device}")


@torch.library.custom_op("bspf_ext::block_mask", mutates_args=(), device_types=())
def block_mask_op(qk: Tensor, score_kernel: Tensor, block_size: int, keep_ratio: float, scale: float) -> Tensor:
    raise NotImplementedError(f"bspf_ext::block_mask has no kernel for device {qk.device}")


@torch.library.custom_op("bspf_ext::score_kernel_grad", mutates_args=(), device_types=())
def score_kernel_grad_op(
    grad_out: Tensor,
    qk: Tensor,
    v: Tensor,
    score_kernel: Tensor,
    mask_words: Tensor,
    match: Tensor,
    rho: Tensor,
    lse: Tensor,
    log_row_sum: Tensor,
    block_size: int,
    keep_ratio: float,
    fuse: bool,
    scale: float,
) -> Tensor:
    raise NotImplementedError(f"bspf_ext::score_kernel_grad has no kernel for device {qk.device}")


# ------------------------------------------------------------- shapes (fake and real)


def saved_layout(qk: Tensor, block_size: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each buffer the forward saves for the backward, in the order of
    bspf_ext::forward's outputs: mask_words, match, rho, lse, log_row_sum."""
    b, h, n, _ = qk.shape
    acc = accumulation_dtype(qk.dtype)
    rows = (b, h, n)
    return [((*rows, num_chunks(n, block_size)), torch.int64), (rows, torch.int32), (rows, acc), (rows, acc),
            (rows, acc)]


def allocate_forward(qk: Tensor, v: Tensor, block_size: int):
    """Every output of bspf_ext::forward, uninitialised. Used by the fake kernel too."""
    out = qk.new_empty((*qk.shape[:3], v.shape[-1]))
    return (out, *(qk.new_empty(shape, dtype=dtype) for shape, dtype in saved_layout(qk, block_size)))


def unpack_mask_words(mask_words: Tensor, n: int, block_size: int) -> Tensor:
    """(B, H, N, C) int64 words -> (B, H, N, N) bool; bit j of word c is column c·Ω + j."""
    bits = torch.arange(block_size, device=mask_words.device, dtype=torch.int64)
    unpacked = (mask_words[..., None] >> bits) & 1
    return unpacked.flatten(-2)[..., :n].bool()


@forward_op.register_fake
def _(qk, v, score_kernel, block_size, keep_ratio, fuse, scale):
    return allocate_forward(qk, v, block_size)


@backward_op.register_fake
def _(grad_out, qk, v, mask_words, match, rho, lse, log_row_sum, block_size, fuse, scale):
    return qk.new_empty(qk.shape), v.new_empty(v.shape)


@score_kernel_grad_op.register_fake
def _(grad_out, qk, v, score_kernel, mask_words, match, rho, lse, log_row_sum, block_size, keep_ratio, fuse, scale):
    return score_kernel.new_empty((3, 3))


@block_mask_op.register_fake
def _(qk, score_kernel, block_size, keep_ratio, scale):
    b, h, n, _ = qk.shape
    return qk.new_empty((b, h, n, n), dtype=torch.bool)


# ------------------------------------------------------------------------ autograd


def _setup_context(ctx, inputs, output):
    qk, v, score_kernel, block_size, _keep_ratio, fuse, scale = inputs
    _out, mask_words, match, rho, lse, log_row_sum = output
    ctx.save_for_backward(qk, v, mask_words, match, rho, lse, log_row_sum)
    ctx.block_size, ctx.fuse, ctx.scale = block_size, fuse, scale
    ctx.kernel_like = (score_kernel.dtype, score_kernel.device)
    ctx.mark_non_differentiable(mask_words, match, rho, lse, log_row_sum)


def _backward(ctx, grad_out, *_unused_grads):
    qk, v, mask_words, match, rho, lse, log_row_sum = ctx.saved_tensors
    grad_qk, grad_v = backward_op(
        grad_out, qk, v, mask_words, match, rho, lse, log_row_sum, ctx.block_size, ctx.fuse, ctx.scale
    )
    # The score kernel only moves the discrete mask: its gradient is exactly zero (SPEC §4).
    grad_kernel = None
    if ctx.needs_input_grad[2]:
        dtype, device = ctx.kernel_like
        grad_kernel = torch.zeros((3, 3), dtype=dtype, device=device)
    return grad_qk, grad_v, grad_kernel, None, None, None, None


forward_op.register_autograd(_backward, setup_context=_setup_context)
