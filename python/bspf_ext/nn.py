"""Attention layers for vision transformers: BSPF (the point of the package) and the two
baselines it is compared with, dense and chunk (block-diagonal) attention.

All three take and return (B, N, C) like timm's `Attention`. The dense layer uses timm's
parameter names (`qkv`, `q_norm`, `k_norm`, `norm`, `proj`), so timm checkpoints load into
it unchanged; BSPF has one shared q/k projection (`qk`) and a value projection (`v`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_bool, check_choice, check_float, check_int, check_tokens
from .ops import block_mask, block_symmetric_attention
from .ops.geometry import box_score_kernel, cpu_compute_dtype, num_chunks
from .ops.validation import check_block_size, check_fuse, check_keep_ratio

__all__ = ["BlockSymmetricAttention", "DenseAttention", "ChunkAttention", "score_kernel_from_theta", "SCORINGS"]

# How a BSPF layer scores off-diagonal blocks:
#   "learned": W = softmax over the 9 entries of (θ + θᵀ)/2, θ a (3, 3) parameter (SPEC §5);
#   "box":     the fixed 3×3 box filter (what θ = 0 gives);
#   "center":  a center-only kernel, each entry scored by its own logit (the paper's "one token").
SCORINGS = ("learned", "box", "center")


def score_kernel_from_theta(theta: Tensor) -> Tensor:
    """W = softmax over the 9 entries of (θ + θᵀ)/2: positive, sums to 1, symmetric (SPEC §5)."""
    symmetric = 0.5 * (theta + theta.transpose(0, 1))
    return torch.softmax(symmetric.reshape(9), dim=0).reshape(3, 3)


def _check_dim_heads(dim, num_heads) -> int:
    check_int("dim", dim, low=1)
    check_int("num_heads", num_heads, low=1)
    if dim % num_heads:
        raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
    return dim // num_heads


def _check_dropout(name: str, p) -> float:
    return check_float(name, p, low=0, high=1)


def _check_flags(**flags) -> None:
    for name, value in flags.items():
        check_bool(name, value)


def _norm(norm_layer: Optional[Callable[[int], nn.Module]], enabled: bool, width: int, what: str) -> nn.Module:
    if not enabled:
        return nn.Identity()
    if norm_layer is None:
        raise ValueError(f"{what}=True needs a norm_layer (e.g. torch.nn.LayerNorm)")
    if not callable(norm_layer):
        raise TypeError(f"norm_layer must be a callable width -> nn.Module (e.g. torch.nn.LayerNorm), got {norm_layer!r}")
    return norm_layer(width)


def _check_no_attn_mask(attn_mask, is_causal: bool) -> None:
    if attn_mask is not None:
        raise ValueError(
            "attn_mask is not supported: BSPF decides its own keep mask from the logits; pass attn_mask=None"
        )
    if is_causal:
        raise ValueError("is_causal=True is not supported: BSPF attention is bidirectional by design")


class DenseAttention(nn.Module):
    """Standard multi-head self-attention with separate q, k, v (timm's `Attention`, same
    parameter names), computed with F.scaled_dot_product_attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
    ) -> None:
        super().__init__()
        self.head_dim = _check_dim_heads(dim, num_heads)
        _check_flags(qkv_bias=qkv_bias, qk_norm=qk_norm, scale_norm=scale_norm, proj_bias=proj_bias)
        self.dim = dim
        self.num_heads = num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = _norm(norm_layer, qk_norm, self.head_dim, "qk_norm")
        self.k_norm = _norm(norm_layer, qk_norm, self.head_dim, "qk_norm")
        self.attn_drop = nn.Dropout(_check_dropout("attn_drop", attn_drop))
        self.norm = _norm(norm_layer, scale_norm, dim, "scale_norm")
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(_check_dropout("proj_drop", proj_drop))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool = False) -> Tensor:
        dropout = self.attn_drop.p if self.training else 0.0
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, scale=self.scale
        )

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        check_tokens("x", x, channels=self.dim, owner=type(self).__name__)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = self._attend(self.q_norm(q), self.k_norm(k), v, attn_mask, is_causal)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(self.norm(x)))


class ChunkAttention(DenseAttention):
    """Block-diagonal attention: each token attends only to its own chunk of `block_size`
    tokens (BSPF with keep_ratio 0, but with separate q and k). The baseline BSPF improves on.

    Chunks are computed as a batch of short sequences (the token axis padded to whole
    chunks, the pad masked out as keys), so the work is ⌈N/Ω⌉·Ω² logits, not N²."""

    def __init__(self, dim: int, num_heads: int = 8, block_size: int = 16, **dense_kwargs) -> None:
        super().__init__(dim, num_heads, **dense_kwargs)
        self.block_size = check_block_size(block_size)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask and is_causal are not supported by ChunkAttention; leave them unset")
        b, h, n, d = q.shape
        omega = self.block_size
        chunks = num_chunks(n, omega)
        pad = chunks * omega - n

        def split(t: Tensor) -> Tensor:
            return F.pad(t, (0, 0, 0, pad)).reshape(b, h, chunks, omega, t.shape[-1])

        key_valid = None
        if pad:
            key_valid = (torch.arange(chunks * omega, device=q.device) < n).reshape(chunks, 1, omega)
        out = super()._attend(split(q), split(k), split(v), key_valid)
        return out.reshape(b, h, chunks * omega, v.shape[-1])[:, :, :n]

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}"


class BlockSymmetricAttention(nn.Module):
    """BSPF self-attention, a drop-in for timm's `Attention`: forward takes and returns (B, N, C).

    Queries and keys come from ONE projection `qk` (W_q = W_k), which makes the logits
    symmetric; values from `v`; then the output projection `proj`. Off-diagonal blocks of
    `block_size` tokens keep their best `keep_ratio` fraction of entries, scored by the 3×3
    kernel W (see `scoring`), and pruned probability is fused into the most similar query's
    row when `fuse` (SPEC §3).

    `scoring`: "learned" holds a raw (3, 3) parameter `theta` and uses
    W = softmax over the 9 entries of (θ + θᵀ)/2 (θ = 0 is the box filter); "box" is the
    fixed box filter; "center" scores each entry by its own logit (the "one token" ablation).

    W only moves the discrete mask, so its true gradient is zero (SPEC §4); θ learns through
    the surrogate gradient of docs/spec.md §4a (a straight-through relaxation of each
    block's top-k; the forward is unchanged).

    Not supported, and refused with a ValueError: attn_drop > 0 (the attention
    probabilities never exist outside the fused operator), and `attn_mask` or
    `is_causal=True` in forward (accepted as arguments, like timm's, only when unset).

    On CPU the operator computes in float32/float64 only, so lower precision inputs (CPU
    autocast, a bf16 model) are computed in float32 and cast back; on CUDA they pass through.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        block_size: int = 16,
        keep_ratio: float = 0.5,
        fuse: bool = True,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
        scoring: str = "learned",
    ) -> None:
        super().__init__()
        self.head_dim = _check_dim_heads(dim, num_heads)
        _check_flags(qkv_bias=qkv_bias, qk_norm=qk_norm, scale_norm=scale_norm, proj_bias=proj_bias)
        self.dim = dim
        self.num_heads = num_heads
        self.scale = self.head_dim**-0.5
        self.block_size = check_block_size(block_size)
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.fuse = check_fuse(fuse)
        if _check_dropout("attn_drop", attn_drop) > 0.0:
            raise ValueError(
                f"attn_drop must be 0.0 for BlockSymmetricAttention, got {attn_drop}: the attention "
                "probabilities live only inside the fused operator, so dropout cannot be applied to them"
            )
        self.scoring = check_choice("scoring", scoring, SCORINGS)

        self.qk = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        # One norm: q and k are the same vectors, so they must be normalised the same way.
        self.qk_norm = _norm(norm_layer, qk_norm, self.head_dim, "qk_norm")
        self.norm = _norm(norm_layer, scale_norm, dim, "scale_norm")
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(_check_dropout("proj_drop", proj_drop))
        if scoring == "learned":
            self.theta = nn.Parameter(torch.zeros(3, 3))
        else:
            self.register_parameter("theta", None)

    def score_kernel(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The 3×3 scoring kernel W this layer passes to the operator.

        Where nothing needs its graph (no gradient for θ, not compiling or tracing), W is
        made once and reused until θ, the dtype or the device changes: making it is a chain
        of small ops that cost a few % of a layer's time at batch 1 on CPU."""
        theta = self.theta
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or (theta is not None and (
                (theta.requires_grad and torch.is_grad_enabled()) or theta.is_inference()
                or type(theta) not in (nn.Parameter, torch.Tensor))):
            return self._make_score_kernel(dtype, device)
        # θ's storage and version counter change with every way of changing its values
        # (in place, load_state_dict, .to() or .data =).
        try:
            key = (dtype, device) if theta is None else (dtype, device, theta.data_ptr(), theta._version)
        except RuntimeError:  # θ has no storage of its own (a torch.func transform's wrapper)
            return self._make_score_kernel(dtype, device)
        cached = getattr(self, "_score_kernel_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self._make_score_kernel(dtype, device))
            self._score_kernel_cache = cached
        return cached[1]

    def _make_score_kernel(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self.scoring == "learned":
            return score_kernel_from_theta(self.theta.float()).to(dtype)
        if self.scoring == "box":
            return box_score_kernel(dtype, device)
        center = torch.zeros(3, 3, dtype=dtype, device=device)
        center[1, 1] = 1.0
        return center

    def shared_qk(self, x: Tensor) -> Tensor:
        """The shared query/key vectors of tokens x (B, N, C), as (B, heads, N, head_dim)."""
        b, n, _ = x.shape
        return self.qk_norm(self.qk(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2))

    def _check_input(self, x) -> None:
        check_tokens("x", x, channels=self.dim, owner=type(self).__name__)

    @torch.no_grad()
    def keep_mask(self, x: Tensor) -> Tensor:
        """The keep mask this layer chooses for tokens x (B, N, C): (B, heads, N, N) bool."""
        self._check_input(x)
        qk = self.shared_qk(x)
        if qk.device.type == "cpu":
            qk = qk.to(cpu_compute_dtype(qk.dtype))
        return block_mask(
            qk, self.score_kernel(qk.dtype, qk.device), block_size=self.block_size,
            keep_ratio=self.keep_ratio, scale=self.scale,
        )

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        _check_no_attn_mask(attn_mask, is_causal)
        self._check_input(x)
        b, n, c = x.shape
        qk = self.shared_qk(x)
        v = self.v(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        out_dtype = qk.dtype
        compute_dtype = cpu_compute_dtype(qk.dtype) if qk.device.type == "cpu" else qk.dtype
        qk, v = qk.to(compute_dtype), v.to(compute_dtype)
        x = block_symmetric_attention(
            qk,
            v,
            self.score_kernel(compute_dtype, qk.device),
            block_size=self.block_size,
            keep_ratio=self.keep_ratio,
            fuse=self.fuse,
            scale=self.scale,
            score_kernel_grad="surrogate" if self.scoring == "learned" else "zero",
        )
        x = x.to(out_dtype).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(self.norm(x)))

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, block_size={self.block_size}, keep_ratio={self.keep_ratio}, "
            f"fuse={self.fuse}, scoring={self.scoring!r}"
        )
