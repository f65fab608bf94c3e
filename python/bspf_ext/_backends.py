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


def require_cuda(qk: torch.Tensor) -> None:
    if not has_cuda_build():
        raise RuntimeError(
            "qk is a CUDA tensor, but bspf_ext was built without CUDA support (nvcc was not "
            "found when it was built); reinstall with nvcc on PATH, or move the tensors to the CPU"
        )
