"""The operator's public functions: arguments checked in one pass, then the custom op."""

from __future__ import annotations

import torch
from torch import Tensor

from . import validation
from .._checks import check_choice
from .cpu import inference_forward_cpu
from .library import backward_op, block_mask_op, forward_op, score_kernel_grad_op

# What the score kernel's gradient is: exactly zero (SPEC §4: W only moves the discrete
# mask), or the surrogate of docs/spec.md §4a that makes a learnable scorer learn.
SCORE_KERNEL_GRADS = ("zero", "surrogate")

__all__ = ["block_symmetric_attention", "block_mask"]


def block_symmetric_attention(
    qk: Tensor,
    v: Tensor,
    score_kernel: Tensor | None = None,
    *,
    block_size: int = 16,
    keep_ratio: float = 0.5,
    fuse: bool = True,
    scale: float | None = None,
    score_kernel_grad: str = "zero",
) -> Tensor:
    """BSPF attention (SPEC §3): out (B, H, N, Dv) from shared query/key `qk` (B, H, N, D)
    and values `v` (B, H, N, Dv).

    `score_kernel` is the 3×3 smoothing kernel W used to score off-diagonal blocks (None:
    the box filter). Each off-diagonal block keeps its ceil(keep_ratio·|block|) best
    entries, decided on the upper triangle and mirrored; pruned probability is fused into
    the most similar query's row when `fuse`. `scale` defaults to D^-1/2.

    Differentiable in qk and v. The gradient for score_kernel is exactly zero (it only
    moves the discrete mask), or with `score_kernel_grad="surrogate"` the surrogate of
    docs/spec.md §4a (the forward is the same either way).
    """
    arguments = validation.attention_arguments(qk, v, score_kernel, block_size, keep_ratio, fuse, scale)
    check_choice("score_kernel_grad", score_kernel_grad, SCORE_KERNEL_GRADS)
    if score_kernel_grad == "surrogate" and arguments[2].requires_grad and torch.is_grad_enabled():
        return _SurrogateScoreKernel.apply(*arguments)[0]
    if _direct_cpu_call(*arguments[:3]):
        return inference_forward_cpu(*arguments)
    return forward_op(*arguments)[0]


def _direct_cpu_call(*tensors: Tensor) -> bool:
    """Whether the forward may call its CPU kernel directly instead of through the
    dispatcher: plain CPU tensors, nothing to differentiate, and nothing that watches the
    dispatcher (tracing or compiling, a dispatch or function mode such as a FLOP counter,
    the profiler). The result is the same; the custom op's Python dispatch runs right
    after the previous call's kernel has taken the caches, which made it cost ~3% of an
    inference call at the target shape (docs/performance.md, "The op's Python layer")."""
    if tensors[0].device.type != "cpu" or any(type(t) not in _PLAIN_TENSORS for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return not (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
        or torch.autograd._profiler_enabled()
    )


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def block_mask(
    qk: Tensor,
    score_kernel: Tensor | None = None,
    *,
    block_size: int = 16,
    keep_ratio: float = 0.5,
    scale: float | None = None,
) -> Tensor:
    """The boolean keep mask M (B, H, N, N) the operator uses (SPEC §3.1–3.3)."""
    return block_mask_op(*validation.mask_arguments(qk, score_kernel, block_size, keep_ratio, scale))


class _SurrogateScoreKernel(torch.autograd.Function):
    """bspf_ext::forward with the surrogate gradient for the score kernel (docs/spec.md
    §4a); qk and v get the same gradients as through the op's own autograd."""

    @staticmethod
    def forward(qk, v, score_kernel, block_size, keep_ratio, fuse, scale):
        return forward_op(qk, v, score_kernel, block_size, keep_ratio, fuse, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        qk, v, score_kernel, block_size, keep_ratio, fuse, scale = inputs
        _out, *saved = output
        ctx.save_for_backward(qk, v, score_kernel, *saved)
        ctx.block_size, ctx.keep_ratio, ctx.fuse, ctx.scale = block_size, keep_ratio, fuse, scale
        ctx.mark_non_differentiable(*saved)

    @staticmethod
    def backward(ctx, grad_out, *_unused_grads):
        qk, v, score_kernel, *saved = ctx.saved_tensors
        grad_qk, grad_v = backward_op(grad_out, qk, v, *saved, ctx.block_size, ctx.fuse, ctx.scale)
        grad_kernel = None
        if ctx.needs_input_grad[2]:
            grad_kernel = score_kernel_grad_op(grad_out, qk, v, score_kernel, *saved, ctx.block_size, ctx.keep_ratio,
                                               ctx.fuse, ctx.scale)
        return grad_qk, grad_v, grad_kernel, None, None, None, None
