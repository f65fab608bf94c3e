"""Which compiled backends this installation has, with clear errors when one is missing."""

from __future__ import annotations

import importlib

import torch


def cpu_capability() -> str:
    """The CPU path calls take now: 'avx2' or 'scalar'."""
    from . import _C

    return _C.capability()


def has_cuda_build() -> bool:
    """Whether the package was built with its CUDA module (nvcc found at build time)."""
    try:
        importlib.import_module("bspf_ext._cuda")
    except ImportError:
        return False
    return True


def load_cuda_kernels() -> bool:
    """Registers the CUDA kernels of the ops when the CUDA module was built; True if so."""
    if not has_cuda_build():
        return False
    importlib.import_module("bspf_ext._cuda_ops")
    return True


def cuda_max_seqlen(dtype: torch.dtype, block_size: int, device=None) -> int:
    """The largest N the CUDA kernels accept for this dtype and block size on `device`
    (one chunk's rows of mask words live in shared memory, which bounds N)."""
    from . import _cuda
    from ._params import _DTYPE_NAMES

    index = torch.device(device if device is not None else "cuda").index
    if index is None:
        index = torch.cuda.current_device()
    return _cuda.max_seqlen(getattr(_cuda.DType, _DTYPE_NAMES[dtype]), block_size, index)


def require_cuda(qk: torch.Tensor) -> None:
    if not has_cuda_build():
        raise RuntimeError(
            "qk is a CUDA tensor, but bspf_ext was built without CUDA support (nvcc was not "
            "found when it was built); reinstall with nvcc on PATH, or move the tensors to the CPU"
        )
