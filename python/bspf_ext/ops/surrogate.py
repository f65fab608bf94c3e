"""The surrogate gradient of the score kernel W (docs/spec.md §4a), for a learnable scorer.

The forward keeps its hard mask; W only moves that mask, so its true gradient is zero
(SPEC §4). The surrogate differentiates a smooth relaxation of each upper block's top-k
instead: M̃ = σ((S − τ) / T), τ midway between the block's k-th and (k+1)-th score, T the
spread of its scores, with τ, T, H and b(i) held fixed. It is computed here with torch
operations from the forward's saved buffers, on any device, only when a caller asks for it
(`score_kernel_grad="surrogate"`); the compiled kernels are not involved. The reference's
linear-space form (bspf_ext.reference, `score_kernel_grad="surrogate"`) is its oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import accumulation_dtype, keep_count, num_chunks
from .library import unpack_mask_words

__all__ = ["logits_of", "mask_gradient", "score_kernel_gradient"]


def _to_blocks(square: Tensor, chunks: int, omega: int) -> Tensor:
    """(..., N, N) -> (..., C, C, Ω, Ω), zero past N (outside every block)."""
    n = square.shape[-1]
    pad = chunks * omega - n
    padded = F.pad(square, (0, pad, 0, pad))
    return padded.reshape(*square.shape[:-2], chunks, omega, chunks, omega).transpose(-3, -2)


def _pattern_similarity(mask: Tensor, match: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    """H_{i, n(j)} (SPEC §3.6) expanded to (..., N, N)."""
    n = mask.shape[-1]
    chunks = num_chunks(n, block_size)
    matched_rows = mask.gather(-2, match[..., None].expand_as(mask))
    differ = F.pad((mask != matched_rows).to(torch.int64), (0, chunks * block_size - n))
    hamming = differ.reshape(*mask.shape[:-1], chunks, block_size).sum(-1)
    sizes = torch.full((chunks,), block_size, dtype=dtype, device=mask.device)
    sizes[-1] = n - (chunks - 1) * block_size
    similarity = 1.0 - hamming.to(dtype) / sizes
    return similarity[..., torch.arange(n, device=mask.device) // block_size]


def _bounded_exp(x: Tensor) -> Tensor:
    # exp of a log-ratio of probabilities; bounded below the type's overflow (reached only
    # at extreme logits, where a fused share outweighs its target row's whole mass).
    return torch.exp(x.clamp(max=math.log(torch.finfo(x.dtype).max) - 8.0))


def logits_of(qk: Tensor, scale: float) -> Tensor:
    """L = scale · X Xᵀ in the accumulation type, once for both steps below."""
    x = qk.to(accumulation_dtype(qk.dtype))
    return scale * (x @ x.transpose(-1, -2))


def mask_gradient(grad_out, logits, v, mask_words, match, rho, lse, log_row_sum, block_size, fuse) -> Tensor:
    """∂loss/∂M (B, H, N, N): the gradient of the output with respect to every entry of the
    keep mask taken as a real number, with H and b(i) held fixed (docs/spec.md §4a)."""
    acc = logits.dtype
    values, g = v.to(acc), grad_out.to(acc)
    n = logits.shape[-1]
    mask = unpack_mask_words(mask_words, n, block_size)
    m = mask.to(acc)
    log_p = logits - lse[..., None].to(acc)  # log P(i, j)
    log_z = log_row_sum.to(acc)
    same = _bounded_exp(log_p - log_z[..., None])  # P(i, j) / Z_i
    grad_a = g @ values.transpose(-1, -2)  # dA
    if fuse:
        target = match.long()
        alone = target == torch.arange(n, device=target.device)
        alpha = (rho.to(acc) * ~alone)[..., None] * _pattern_similarity(mask, target, block_size, acc)
        to_target = _bounded_exp(log_p - log_z.gather(-1, target)[..., None])  # P(i, j) / Z_b(i)
        # Φ(p, j) / Z_p: what row p would receive at column j if it kept (p, j).
        shares = torch.where(mask, 0.0, alpha * to_target)
        phi = torch.zeros_like(shares).scatter_add(-2, target[..., None].expand_as(shares), shares)
    else:
        phi = torch.zeros_like(same)
    own = same + phi
    z_grad_r = grad_a - (m * own * grad_a).sum(-1, keepdim=True)  # Z_i · dR(i, j), for every j
    grad_m = z_grad_r * own
    if fuse:
        rows = target[..., None].expand_as(grad_m)
        # Keeping (p, j) withdraws its share from row b(p) where that row keeps j.
        grad_m = grad_m - m.gather(-2, rows) * alpha * to_target * z_grad_r.gather(-2, rows)
    return grad_m


def score_kernel_gradient(grad_mask: Tensor, logits: Tensor, score_kernel: Tensor, block_size: int,
                          keep_ratio: float) -> Tensor:
    """The surrogate gradient of the (3, 3) score kernel from ∂loss/∂M (docs/spec.md §4a)."""
    acc = grad_mask.dtype
    n = logits.shape[-1]
    omega, chunks = block_size, num_chunks(n, block_size)
    device = logits.device
    sizes = [omega] * (chunks - 1) + [n - (chunks - 1) * omega]
    # Only upper blocks with a choice (1 <= k < |block|) have a relaxation.
    pairs = [(m, c) for m in range(chunks) for c in range(m + 1, chunks)
             if 1 <= keep_count(keep_ratio, sizes[m], sizes[c]) < sizes[m] * sizes[c]]
    if not pairs:
        return torch.zeros_like(score_kernel)
    rows = torch.tensor([m for m, _ in pairs], device=device)
    cols = torch.tensor([c for _, c in pairs], device=device)
    k = torch.tensor([keep_count(keep_ratio, sizes[m], sizes[c]) for m, c in pairs], device=device)
    count = torch.tensor([sizes[m] * sizes[c] for m, c in pairs], device=device, dtype=acc)
    local = torch.arange(omega, device=device)
    size_t = torch.tensor(sizes, device=device)
    row_valid = local[None, :] < size_t[:, None]  # (C, Ω)
    valid = (row_valid[rows][:, :, None] & row_valid[cols][:, None, :]).reshape(len(pairs), omega * omega)

    tiles = _to_blocks(logits, chunks, omega)[..., rows, cols, :, :].reshape(-1, len(pairs), omega, omega)
    # S = conv3x3(L, W) with zero padding: the nine shifted copies of each block (its taps),
    # weighted. S is linear in W, so the taps are also ∂S/∂W.
    padded = F.pad(tiles, (1, 1, 1, 1))
    taps = torch.stack([padded[..., a : a + omega, b : b + omega] for a in range(3) for b in range(3)], dim=-1)
    taps = taps.reshape(*taps.shape[:-3], omega * omega, 9)
    s = taps @ score_kernel.detach().to(acc).reshape(9)  # (batch, pairs, Ω·Ω)

    ranked = s.masked_fill(~valid, -math.inf).sort(dim=-1, descending=True).values
    kth = ranked.gather(-1, (k - 1)[None, :, None].expand(ranked.shape[0], -1, 1))
    threshold = 0.5 * (kth + ranked.gather(-1, k[None, :, None].expand(ranked.shape[0], -1, 1)))
    mean = torch.where(valid, s, 0.0).sum(-1, keepdim=True) / count[:, None]
    spread = (torch.where(valid, s - mean, 0.0).square().sum(-1, keepdim=True) / count[:, None]).sqrt()
    active = valid & (spread > 0) & torch.isfinite(threshold)
    spread = torch.where(spread > 0, spread, 1.0)
    sig = torch.sigmoid((s - torch.where(torch.isfinite(threshold), threshold, 0.0)) / spread)
    slope = sig * (1.0 - sig) / spread
    # An upper entry (i, j) stands for itself and its mirror (j, i): both follow its score.
    both = grad_mask + grad_mask.transpose(-1, -2)
    upstream = _to_blocks(both, chunks, omega)[..., rows, cols, :, :].reshape(-1, len(pairs), omega * omega)
    grad_scores = torch.where(active, upstream * slope, 0.0)
    return (grad_scores.reshape(1, -1) @ taps.reshape(-1, 9)).reshape(3, 3).to(score_kernel.dtype)
