"""The operator's constants and geometry, each stated once: every other module (the
reference included) imports them from here. A leaf: it imports nothing of the package.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "MAX_BLOCK_SIZE",
    "COSINE_EPS",
    "OP_DTYPES",
    "CPU_DTYPES",
    "DTYPE_NAMES",
    "num_chunks",
    "keep_count",
    "box_score_kernel",
    "accumulation_dtype",
    "cpu_compute_dtype",
]

# One row of a block is one 64-bit mask word (the saved mask_words, SPEC §3.6's popcount).
MAX_BLOCK_SIZE = 64

# cos(x, y) = x·y / max(‖x‖‖y‖, COSINE_EPS) in the operator (SPEC §3.5); the similarity
# pruning of bspf_ext.pruning uses the same epsilon on each norm.
COSINE_EPS = 1e-8

# The dtypes some kernel of the operator computes in; the CPU kernels take the first two.
OP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float64)

# The names the compiled modules' DType enums use.
DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


def num_chunks(seqlen: int, block_size: int) -> int:
    """C = ceil(N / Ω): the chunks of N tokens, the last one possibly ragged."""
    return -(-seqlen // block_size)


def keep_count(keep_ratio: float, rows: int, cols: int) -> int:
    """k = ceil(r·rows·cols − 1e-9): entries kept in an off-diagonal block (SPEC §3.3).

    Evaluated in double precision in exactly this order by every implementation, so
    all of them keep the same number of entries.
    """
    return max(0, math.ceil(keep_ratio * rows * cols - 1e-9))


def box_score_kernel(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The 3×3 box filter, the default score kernel (θ = 0 in SPEC §5)."""
    return torch.full((3, 3), 1.0 / 9.0, dtype=dtype, device=device)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type the kernels compute and save statistics in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cpu_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a CPU caller computes in: its own when the CPU kernels take it, else float32."""
    return dtype if dtype in CPU_DTYPES else torch.float32
