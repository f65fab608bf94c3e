"""Which compiled backends this installation has, with clear errors when one is missing."""

from __future__ import annotations

import functools
import importlib

import torch

from .geometry import DTYPE_NAMES


def cpu_capability() -> str:
    """The CPU path calls take now: 'avx2' or 'scalar'."""
    from .. import _C

    return _C.capability()


def has_cuda_build() -> bool:
    """Whether the package was built with its CUDA module (nvcc found at build time)."""
    try:
        importlib.import_module("bspf_ext._cuda")
    except ImportError:
        return False
    return True


def cuda_max_seqlen(dtype: torch.dtype, block_size: int, device=None) -> int:
    """The largest N the CUDA forward and backward both accept for this dtype and block
    size on `device`, at head dims of 64 (a strip's logits against every column live in
    shared memory, which bounds N; see docs/performance.md)."""
    from .. import _cuda

    index = torch.device(device if device is not None else "cuda").index
    if index is None:
        index = torch.cuda.current_device()
    return _cuda.max_seqlen(getattr(_cuda.DType, DTYPE_NAMES[dtype]), block_size, index)


def _version_string(version: int) -> str:
    """13000 -> "13.0", 12040 -> "12.4" (CUDA's encoding: 1000·major + 10·minor)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_mismatch_message(driver: int, runtime: int) -> str | None:
    """Why the CUDA module cannot run on this driver, or None when it can.

    The module links the CUDA runtime statically, so a driver older than the toolkit it
    was built with makes the first CUDA call fail with an unexplained "insufficient
    driver". Only an older major version is refused: within one major version CUDA's
    minor-version compatibility lets a newer runtime run on an older driver (13.1 on a
    13.0 driver). driver == 0 means no driver at all; then nothing is said here and the
    kernels' own "no GPU" error stands.
    """
    if driver == 0 or driver // 1000 >= runtime // 1000:
        return None
    built, supported = _version_string(runtime), _version_string(driver)
    # A toolkit this driver runs: torch's own when torch has CUDA (its CUDA works here).
    toolkit = torch.version.cuda or supported
    example = f"the one torch uses, torch.version.cuda = {toolkit}" if torch.version.cuda else f"CUDA {toolkit}"
    return (
        f"bspf_ext's CUDA module was built with CUDA {built}, but the NVIDIA driver supports CUDA "
        f"{supported} at most, so its kernels cannot run (CUDA would report 'insufficient driver'). "
        f"Rebuild bspf_ext with a CUDA toolkit this driver supports ({example}): put that toolkit's "
        f"nvcc first on PATH or set CUDACXX=/usr/local/cuda-{toolkit}/bin/nvcc, then run "
        f"`pip install --no-build-isolation .` in the bspf_ext source tree; or update the NVIDIA "
        f"driver to one for CUDA {built} or newer."
    )


@functools.cache
def _cuda_driver_problem() -> str | None:
    # Checked once per process: the driver cannot change under a running process.
    from .. import _cuda

    return driver_mismatch_message(_cuda.driver_version(), _cuda.runtime_version())


def check_cuda_driver() -> None:
    """Raises RuntimeError naming both CUDA versions when the driver is too old for the
    CUDA module (see driver_mismatch_message). Called before every CUDA kernel; cached."""
    problem = _cuda_driver_problem()
    if problem is not None:
        raise RuntimeError(problem)


def require_cuda() -> None:
    """The CUDA kernels are built and the driver can run them, or a RuntimeError says why."""
    if not has_cuda_build():
        raise RuntimeError(
            "qk is a CUDA tensor, but bspf_ext was built without CUDA support (nvcc was not "
            "found when it was built); reinstall with nvcc on PATH, or move the tensors to the CPU"
        )
    check_cuda_driver()
