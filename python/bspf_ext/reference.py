"""The BSPF operator in plain, vectorised PyTorch: the oracle every kernel is tested against.

Written straight from SPEC.md §3. Everything is batched over (B, H); there are no
Python loops over tokens or blocks. A ragged last chunk (N mod block_size != 0) is
handled by padding the token axis to a whole number of chunks and masking the pad.

The discrete choices (the keep mask M and the best match b(i)) are made under
no_grad, so autograd through this module gives exactly SPEC §4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops.geometry import COSINE_EPS, MAX_BLOCK_SIZE, box_score_kernel, keep_count, num_chunks

__all__ = [
    "block_symmetric_attention",
    "block_mask",
    "best_match",
    "block_scores",
    "box_score_kernel",
    "keep_count",
]


def _chunk_sizes(n: int, block_size: int, device) -> torch.Tensor:
    """|c| for every chunk c, as a 1-D int64 tensor."""
    chunks = num_chunks(n, block_size)
    sizes = torch.full((chunks,), block_size, dtype=torch.int64, device=device)
    if chunks:
        sizes[-1] = n - (chunks - 1) * block_size
    return sizes


def _logits(qk: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * (qk @ qk.transpose(-1, -2))


def _resolve_scale(qk: torch.Tensor, scale: float | None) -> float:
    return qk.shape[-1] ** -0.5 if scale is None else float(scale)


def _block_scores(logits: torch.Tensor, score_kernel: torch.Tensor, block_size: int) -> torch.Tensor:
    """S = conv3x3(L_mn, W) for every block (SPEC §3.2): (batch, C, C, Ω·Ω), row-major per block."""
    n = logits.shape[-1]
    omega = block_size
    chunks = num_chunks(n, omega)
    padded = chunks * omega
    # The pad is outside every block, so zero logits there are exactly the conv's zero padding.
    lp = F.pad(logits, (0, padded - n, 0, padded - n))
    blocks = lp.reshape(-1, chunks, omega, chunks, omega).transpose(2, 3)
    flat = blocks.reshape(-1, 1, omega, omega)
    weight = score_kernel.to(dtype=logits.dtype, device=logits.device).reshape(1, 1, 3, 3)
    return F.conv2d(flat, weight, padding=1).reshape(-1, chunks, chunks, omega * omega)


@torch.no_grad()
def _keep_mask_from_logits(
    logits: torch.Tensor, score_kernel: torch.Tensor, block_size: int, keep_ratio: float
) -> torch.Tensor:
    """SPEC §3.2–3.3: score upper blocks, keep each block's top k, mirror, full diagonal."""
    *batch, n, _ = logits.shape
    omega = block_size
    chunks = num_chunks(n, omega)
    padded = chunks * omega
    device = logits.device
    scores = _block_scores(logits, score_kernel, block_size)

    # Pad entries rank after every finite real score (they are never kept either way).
    sizes = _chunk_sizes(n, omega, device)
    local = torch.arange(omega, device=device)
    row_valid = local[None, :] < sizes[:, None]  # (C, Ω)
    entry_valid = (row_valid[:, None, :, None] & row_valid[None, :, None, :]).reshape(
        chunks, chunks, omega * omega
    )
    # A stable descending sort keeps the smaller row-major index first among equal scores
    # (SPEC tie rule); row-major order over the padded block is the block's own order.
    scores = scores.masked_fill(~entry_valid, -math.inf)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(omega * omega, device=device).expand_as(order))

    k = torch.tensor(
        [[keep_count(keep_ratio, int(a), int(b)) for b in sizes.tolist()] for a in sizes.tolist()],
        dtype=torch.int64,
        device=device,
    )
    keep = (rank < k[:, :, None]) & entry_valid

    chunk = torch.arange(chunks, device=device)
    upper = chunk[:, None] < chunk[None, :]
    keep = keep & upper[:, :, None]
    keep = keep.reshape(-1, chunks, chunks, omega, omega)
    keep = keep | keep.transpose(1, 2).transpose(-1, -2)  # mirror the upper blocks
    keep = keep | torch.eye(chunks, dtype=torch.bool, device=device)[:, :, None, None]
    mask = keep.transpose(2, 3).reshape(-1, padded, padded)[:, :n, :n]
    return mask.reshape(*batch, n, n)


def _cosine_within_chunks(qk: torch.Tensor, block_size: int) -> torch.Tensor:
    """cos(x_i, x_j) for every pair of tokens of the same chunk: (..., C, Ω, Ω), pad rows 0."""
    *batch, n, d = qk.shape
    chunks = num_chunks(n, block_size)
    x = F.pad(qk, (0, 0, 0, chunks * block_size - n)).reshape(*batch, chunks, block_size, d)
    norms = torch.linalg.vector_norm(x, dim=-1)
    dots = x @ x.transpose(-1, -2)
    return dots / (norms[..., :, None] * norms[..., None, :]).clamp_min(COSINE_EPS)


def _match_from_cosine(cos: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """b(i): the other token of i's chunk with the largest cosine, ties to the smaller index.

    A token alone in its chunk is its own match (it then fuses nothing, since ρ is 0).
    Returns global token indices, (..., N) int64.
    """
    *batch, chunks, omega, _ = cos.shape
    device = cos.device
    local = torch.arange(omega, device=device)
    sizes = _chunk_sizes(n, omega, device)
    candidate = (local[None, None, :] < sizes[:, None, None]) & (local[:, None] != local[None, :])
    scored = cos.detach().masked_fill(~candidate, -math.inf)
    # argmax returns the first maximal index: the smaller index wins a tie.
    best = scored.argmax(dim=-1)
    alone = (sizes == 1)[:, None]
    best = torch.where(alone, local[None, :], best)
    best = best + (torch.arange(chunks, device=device) * omega)[:, None]
    return best.reshape(*batch, chunks * omega)[..., :n]


def _match_and_rho(qk: torch.Tensor, block_size: int, match: torch.Tensor | None = None):
    """b(i) (chosen under no_grad unless given) and the differentiable ρ_i = max(cos, 0)."""
    n = qk.shape[-2]
    cos = _cosine_within_chunks(qk, block_size)
    if match is None:
        with torch.no_grad():
            match = _match_from_cosine(cos, n, block_size)
    chunks, omega = cos.shape[-3], cos.shape[-1]
    # Index the chunk-local cosine table at (i, b(i)).
    local_match = match % omega
    cos_rows = cos.reshape(*cos.shape[:-3], chunks * omega, omega)[..., :n, :]
    rho = cos_rows.gather(-1, local_match[..., None]).squeeze(-1).clamp_min(0)
    rho = torch.where(match == torch.arange(n, device=qk.device), torch.zeros_like(rho), rho)
    return match, rho


def _check(qk: torch.Tensor, block_size: int, keep_ratio: float) -> None:
    if qk.dim() != 4:
        raise ValueError(f"qk must have shape (B, H, N, D), got {tuple(qk.shape)}")
    if not isinstance(block_size, int) or not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be an int in [1, {MAX_BLOCK_SIZE}], got {block_size!r}")
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio!r}")


def block_mask(
    qk: torch.Tensor,
    score_kernel: torch.Tensor | None = None,
    *,
    block_size: int = 16,
    keep_ratio: float = 0.5,
    scale: float | None = None,
) -> torch.Tensor:
    """The boolean keep mask M, (B, H, N, N) (SPEC §3.1–3.3)."""
    _check(qk, block_size, keep_ratio)
    if score_kernel is None:
        score_kernel = box_score_kernel(qk.dtype, qk.device)
    with torch.no_grad():
        logits = _logits(qk, _resolve_scale(qk, scale))
        return _keep_mask_from_logits(logits, score_kernel, block_size, keep_ratio)


def block_scores(
    qk: torch.Tensor,
    score_kernel: torch.Tensor | None = None,
    *,
    block_size: int = 16,
    scale: float | None = None,
) -> torch.Tensor:
    """The scores S (SPEC §3.2) laid out like the mask, (B, H, N, N): S_mn at the entries of
    every upper block (m < n), NaN elsewhere. Tests use it for the near-tie rule (SPEC §6)."""
    _check(qk, block_size, 0.0)
    if score_kernel is None:
        score_kernel = box_score_kernel(qk.dtype, qk.device)
    *batch, n, _ = qk.shape
    chunks = num_chunks(n, block_size)
    padded = chunks * block_size
    with torch.no_grad():
        scores = _block_scores(_logits(qk, _resolve_scale(qk, scale)), score_kernel, block_size)
        chunk = torch.arange(chunks, device=qk.device)
        upper = chunk[:, None] < chunk[None, :]
        scores = scores.masked_fill(~upper[:, :, None], math.nan)
        scores = scores.reshape(-1, chunks, chunks, block_size, block_size).transpose(2, 3)
        return scores.reshape(-1, padded, padded)[:, :n, :n].reshape(*batch, n, n)


def best_match(qk: torch.Tensor, *, block_size: int = 16) -> torch.Tensor:
    """b(i) for every token, (B, H, N) int64 global indices (SPEC §3.5)."""
    with torch.no_grad():
        return _match_from_cosine(_cosine_within_chunks(qk, block_size), qk.shape[-2], block_size)


def _pattern_similarity(mask: torch.Tensor, match: torch.Tensor, block_size: int) -> torch.Tensor:
    """H_{i,n(j)} expanded to (..., N, N): 1 − Hamming(M[i, chunk n], M[b(i), chunk n]) / |n|."""
    n = mask.shape[-1]
    chunks = num_chunks(n, block_size)
    matched_rows = mask.gather(-2, match[..., None].expand_as(mask))
    differ = F.pad((mask != matched_rows).to(torch.int64), (0, chunks * block_size - n))
    hamming = differ.reshape(*mask.shape[:-1], chunks, block_size).sum(-1)
    sizes = _chunk_sizes(n, block_size, mask.device)
    similarity = 1.0 - hamming.to(torch.float64) / sizes
    column_chunk = torch.arange(n, device=mask.device) // block_size
    return similarity[..., column_chunk]


def block_symmetric_attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    score_kernel: torch.Tensor | None = None,
    *,
    block_size: int = 16,
    keep_ratio: float = 0.5,
    fuse: bool = True,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    match: torch.Tensor | None = None,
    score_kernel_grad: str = "zero",
) -> torch.Tensor:
    """BSPF attention, SPEC §3. Differentiable in qk and v (SPEC §4).

    `mask` and `match` override the discrete choices; tests use them to compare a
    low-precision kernel with a float64 reference that makes the kernel's own choices
    (SPEC §6, near-ties). `score_kernel_grad="surrogate"` gives score_kernel the surrogate
    gradient of docs/spec.md §4a (computed in linear space: not for extreme logits).
    """
    _check(qk, block_size, keep_ratio)
    if score_kernel is None:
        score_kernel = box_score_kernel(qk.dtype, qk.device)
    n = qk.shape[-2]
    if n == 0 or qk.numel() == 0:
        return qk.new_zeros(*qk.shape[:-1], v.shape[-1]) + 0 * v.sum()
    if score_kernel_grad == "surrogate":
        return _surrogate_attention(qk, v, score_kernel, block_size, keep_ratio, fuse, _resolve_scale(qk, scale),
                                    mask, match)
    if score_kernel_grad != "zero":
        raise ValueError(f"score_kernel_grad must be 'zero' or 'surrogate', got {score_kernel_grad!r}")

    logits = _logits(qk, _resolve_scale(qk, scale))
    if mask is None:
        mask = _keep_mask_from_logits(logits.detach(), score_kernel, block_size, keep_ratio)
    mask = mask.expand_as(logits)
    # In log space (SPEC §6, extreme logits): log P is finite for any finite logits, while
    # P itself may underflow on every kept entry of a row whose mass sits on pruned ones.
    log_probs = torch.log_softmax(logits, dim=-1)
    own = log_probs.masked_fill(~mask, -math.inf)  # log of P ⊙ M

    if fuse:
        match, rho = _match_and_rho(qk, block_size, match)
        match = match.expand(*logits.shape[:-1])
        alpha = rho[..., None] * _pattern_similarity(mask, match, block_size).to(logits.dtype)
        target_kept = mask.gather(-2, match[..., None].expand_as(mask))
        moved = ~mask & target_kept & (alpha > 0)
        # log(ρ_i · H · P(i, j)) on the entries row i moves to row b(i); log of 1 elsewhere
        # keeps the gradient of the unused branch finite.
        log_alpha = torch.log(torch.where(moved, alpha, torch.ones_like(alpha)))
        shares = (log_probs + log_alpha).masked_fill(~moved, -math.inf)
        with torch.no_grad():
            # Each row's largest term: R / exp(shift) then has entries <= 1 and a row sum >= 1.
            # A = R / Z does not depend on the shift, so it carries no gradient.
            share_max = own.new_full(own.shape[:-1], -math.inf).scatter_reduce(-1, match, shares.amax(-1), "amax")
            shift = torch.maximum(own.amax(-1), share_max)
        weights = torch.exp(own - shift[..., None])
        weights = weights.scatter_add(
            -2, match[..., None].expand_as(shares), torch.exp(shares - shift.gather(-1, match)[..., None])
        )
    else:
        weights = torch.exp(own - own.detach().amax(-1, keepdim=True))

    attn = weights / weights.sum(-1, keepdim=True)
    return attn @ v


def _relaxed_mask(logits: torch.Tensor, score_kernel: torch.Tensor, block_size: int, keep_ratio: float,
                  anchor_kernel: torch.Tensor) -> torch.Tensor:
    """M̃ (docs/spec.md §4a): σ((S − τ) / T) on upper blocks with a choice, mirrored, and 0
    elsewhere; differentiable in score_kernel only (the logits are taken as constants).
    τ and T are those of the scores under `anchor_kernel` (constants)."""
    *batch, n, _ = logits.shape
    omega, chunks = block_size, num_chunks(n, block_size)
    padded = chunks * omega
    device = logits.device
    scores = _block_scores(logits.detach(), score_kernel, block_size)  # (batch, C, C, Ω·Ω)
    anchored = _block_scores(logits.detach(), anchor_kernel.detach(), block_size)
    sizes = _chunk_sizes(n, omega, device)
    local = torch.arange(omega, device=device)
    row_valid = local[None, :] < sizes[:, None]
    valid = (row_valid[:, None, :, None] & row_valid[None, :, None, :]).reshape(chunks, chunks, omega * omega)
    relaxed = scores * 0  # blocks without a choice: zero, still a function of score_kernel
    chunk_list = sizes.tolist()
    for m in range(chunks):
        for c in range(m + 1, chunks):
            count = chunk_list[m] * chunk_list[c]
            k = keep_count(keep_ratio, chunk_list[m], chunk_list[c])
            if not 1 <= k < count:
                continue
            block = scores[:, m, c][:, valid[m, c]]  # (batch, count), row-major
            fixed = anchored[:, m, c][:, valid[m, c]]
            ranked = fixed.sort(dim=-1, descending=True).values
            threshold = 0.5 * (ranked[:, k - 1] + ranked[:, k])
            spread = fixed.std(dim=-1, unbiased=False)
            soft = torch.sigmoid((block - threshold[:, None]) / spread[:, None].clamp_min(1e-300))
            soft = torch.where(spread[:, None] > 0, soft, soft.detach())
            relaxed[:, m, c, valid[m, c]] = soft
    upper = relaxed.reshape(-1, chunks, chunks, omega, omega)
    full = upper + upper.transpose(1, 2).transpose(-1, -2)
    return full.transpose(2, 3).reshape(-1, padded, padded)[:, :n, :n].reshape(*batch, n, n)


def _surrogate_attention(qk, v, score_kernel, block_size, keep_ratio, fuse, scale, mask, match, anchor_kernel=None):
    """SPEC §3 in linear space with the mask as a real number M + M̃(W) − M̃(W₀), H and b(i)
    held fixed (docs/spec.md §4a). W₀ = `anchor_kernel`, by default the value of W itself:
    then the mask equals M and carries the gradient of M̃ (the surrogate). With another
    anchor it is a smooth function of W whose derivative at W = W₀ is the surrogate
    (what tests check with gradcheck)."""
    logits = _logits(qk, scale)
    anchor = score_kernel.detach() if anchor_kernel is None else anchor_kernel
    if mask is None:
        mask = _keep_mask_from_logits(logits.detach(), anchor, block_size, keep_ratio)
    mask = mask.expand_as(logits)
    relaxed = _relaxed_mask(logits, score_kernel, block_size, keep_ratio, anchor)
    at_anchor = _relaxed_mask(logits, anchor, block_size, keep_ratio, anchor).detach()
    m = mask.to(logits.dtype) + (relaxed - at_anchor)
    probs = torch.softmax(logits, dim=-1)
    r = probs * m
    if fuse:
        match, rho = _match_and_rho(qk, block_size, match)
        match = match.expand(*logits.shape[:-1])
        alpha = rho[..., None] * _pattern_similarity(mask, match, block_size).to(logits.dtype)
        rows = match[..., None].expand_as(logits)
        shares = alpha * probs * (1 - m)
        r = r + m * torch.zeros_like(shares).scatter_add(-2, rows, shares)
    return (r / r.sum(-1, keepdim=True)) @ v
