"""The BSPF operator registered with torch.library: validation, the custom ops, their
fake (meta) implementations and autograd. Device kernels register themselves from
_cpu_ops.py (and the CUDA launcher when the package was built with CUDA).

Three ops:
  bspf_ext::forward   -> (out, mask_words, match, rho, lse, log_row_sum); the last five are
                         the discrete choices and row statistics saved for the backward
  bspf_ext::backward  -> (grad_qk, grad_v), its own op so compile/opcheck/graphs compose
  bspf_ext::block_mask -> the boolean keep mask
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validation as check
from ._params import accumulation_dtype, num_chunks
from .reference import box_kernel

__all__ = ["block_symmetric_attention", "block_mask"]


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


# ------------------------------------------------------------- shapes (fake and real)


def allocate_forward(qk: Tensor, v: Tensor, block_size: int):
    """Every output of bspf_ext::forward, uninitialised. Used by the fake kernel too."""
    b, h, n, _ = qk.shape
    acc = accumulation_dtype(qk.dtype)
    out = qk.new_empty((b, h, n, v.shape[-1]))
    mask_words = qk.new_empty((b, h, n, num_chunks(n, block_size)), dtype=torch.int64)
    match = qk.new_empty((b, h, n), dtype=torch.int32)
    rho, lse, log_row_sum = (qk.new_empty((b, h, n), dtype=acc) for _ in range(3))
    return out, mask_words, match, rho, lse, log_row_sum


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


# ---------------------------------------------------------------------- public API


def _check_backend(qk: Tensor) -> None:
    if qk.device.type == "meta":
        return  # shapes only: the fake implementation answers (deferred init, FLOP counting)
    if qk.device.type == "cpu":
        if qk.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"qk on CPU must be float32 or float64 (the CPU kernels' types), got {qk.dtype}; "
                "upcast it, or run on CUDA for float16/bfloat16"
            )
    elif qk.device.type == "cuda":
        from . import _backends

        _backends.require_cuda(qk)
    else:
        raise ValueError(f"qk must be on a cpu, cuda or meta device, got {qk.device}")


def _default_kernel(score_kernel, qk: Tensor) -> Tensor:
    if score_kernel is None:
        return box_kernel(qk.dtype, qk.device)
    check.check_score_kernel(score_kernel, qk)
    return score_kernel


def block_symmetric_attention(
    qk: Tensor,
    v: Tensor,
    score_kernel: Tensor | None = None,
    *,
    block_size: int = 16,
    keep_ratio: float = 0.5,
    fuse: bool = True,
    scale: float | None = None,
) -> Tensor:
    """BSPF attention (SPEC §3): out (B, H, N, Dv) from shared query/key `qk` (B, H, N, D)
    and values `v` (B, H, N, Dv).

    `score_kernel` is the 3×3 smoothing kernel W used to score off-diagonal blocks (None:
    the box filter). Each off-diagonal block keeps its ceil(keep_ratio·|block|) best
    entries, decided on the upper triangle and mirrored; pruned probability is fused into
    the most similar query's row when `fuse`. `scale` defaults to D^-1/2.

    Differentiable in qk and v; the gradient for score_kernel is exactly zero (it only
    moves the discrete mask).
    """
    check.check_qk(qk)
    check.check_v(v, qk)
    block_size = check.check_block_size(block_size)
    keep_ratio = check.check_keep_ratio(keep_ratio)
    fuse = check.check_fuse(fuse)
    scale = check.check_scale(scale, qk.shape[-1])
    kernel = _default_kernel(score_kernel, qk)
    _check_backend(qk)
    return forward_op(qk, v, kernel, block_size, keep_ratio, fuse, scale)[0]


def block_mask(
    qk: Tensor,
    score_kernel: Tensor | None = None,
    *,
    block_size: int = 16,
    keep_ratio: float = 0.5,
    scale: float | None = None,
) -> Tensor:
    """The boolean keep mask M (B, H, N, N) the operator uses (SPEC §3.1–3.3)."""
    check.check_qk(qk)
    block_size = check.check_block_size(block_size)
    keep_ratio = check.check_keep_ratio(keep_ratio)
    scale = check.check_scale(scale, qk.shape[-1])
    kernel = _default_kernel(score_kernel, qk)
    _check_backend(qk)
    return block_mask_op(qk, kernel, block_size, keep_ratio, scale)
