"""ctypes bindings of the emulator's probe library (tools/cuda_emulation/probe/probe.cpp):
test kernels for the emulated runtime itself."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from .module import built

FULL = 0xFFFFFFFF
_ERROR_SIZE = 8192


class EmulatedCudaError(RuntimeError):
    """A launch failed; `code` is the cudaError_t value, the message its error string."""

    def __init__(self, code: int, message: str):
        super().__init__(f"cudaError {code}: {message}")
        self.code = code
        self.message = message


class Probe:
    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        c = ctypes
        self.lib.bspf_probe_convert.argtypes = [c.c_char_p, c.c_void_p, c.c_void_p, c.c_int64]
        self.lib.bspf_probe_warp_op.argtypes = [c.c_char_p, c.c_uint, c.c_uint, c.c_void_p, c.c_void_p, c.c_int,
                                                c.c_void_p, c.c_char_p, c.c_size_t]
        self.lib.bspf_probe_barrier_reduce.argtypes = [c.c_int, c.c_int, c.c_void_p, c.c_void_p, c.c_char_p,
                                                       c.c_size_t]
        self.lib.bspf_probe_exchange.argtypes = [c.c_uint, c.c_void_p, c.c_char_p, c.c_size_t]
        self.lib.bspf_probe_mma.argtypes = [c.c_int, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_char_p,
                                            c.c_size_t]
        self.lib.bspf_probe_scenario.argtypes = [c.c_char_p, c.c_void_p, c.c_char_p, c.c_size_t]

    @staticmethod
    def _check(code: int, error) -> None:
        if code != 0:
            raise EmulatedCudaError(code, error.value.decode(errors="replace"))

    def convert(self, kind: str, src: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """One of the conversions (e.g. "float2half_rn") applied to every element."""
        src = src.contiguous()
        out = torch.empty(src.shape, dtype=out_dtype)
        code = self.lib.bspf_probe_convert(kind.encode(), src.data_ptr(), out.data_ptr(), src.numel())
        assert code == 0, f"unknown conversion {kind}"
        return out

    def warp_op(self, op: str, values, *, args=None, active=FULL, mask=FULL, width=32) -> list:
        """Runs one warp intrinsic in a 32-thread block; results[lane] for active lanes, else None."""
        vals = (ctypes.c_uint * 32)(*[v & FULL for v in values])
        argv = (ctypes.c_uint * 32)(*[(a & FULL) for a in (args or [0] * 32)])
        results = (ctypes.c_ulonglong * 32)()
        error = ctypes.create_string_buffer(_ERROR_SIZE)
        code = self.lib.bspf_probe_warp_op(op.encode(), active, mask, vals, argv, width, results, error, _ERROR_SIZE)
        self._check(code, error)
        return [results[lane] if active >> lane & 1 else None for lane in range(32)]

    def barrier_reduce(self, op: int, predicates: list[int]) -> list[int]:
        """__syncthreads_count (0), _and (1) or _or (2); one result per thread."""
        n = len(predicates)
        preds = (ctypes.c_int * n)(*predicates)
        results = (ctypes.c_int * n)()
        error = ctypes.create_string_buffer(_ERROR_SIZE)
        self._check(self.lib.bspf_probe_barrier_reduce(op, n, preds, results, error, _ERROR_SIZE), error)
        return list(results)

    def exchange(self, nbytes: int) -> torch.Tensor:
        """(32 receiving lanes, 32 source lanes, nbytes) from bspf_emulation::warp_exchange."""
        out = torch.zeros(32 * 32 * nbytes, dtype=torch.uint8)
        error = ctypes.create_string_buffer(_ERROR_SIZE)
        self._check(self.lib.bspf_probe_exchange(nbytes, out.data_ptr(), error, _ERROR_SIZE), error)
        return out.reshape(32, 32, nbytes)

    def mma(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """D = A·B + C through csrc/cuda/mma.cuh (A 16×16, B 16×8 in fp16 or bf16; C fp32)."""
        assert a.shape == (16, 16) and b.shape == (16, 8) and c.shape == (16, 8) and a.dtype == b.dtype
        a, b, c = a.contiguous(), b.contiguous(), c.to(torch.float32).contiguous()
        d = torch.full((16, 8), float("nan"), dtype=torch.float32)
        error = ctypes.create_string_buffer(_ERROR_SIZE)
        code = self.lib.bspf_probe_mma(int(a.dtype == torch.bfloat16), a.data_ptr(), b.data_ptr(), c.data_ptr(),
                                       d.data_ptr(), error, _ERROR_SIZE)
        self._check(code, error)
        return d

    def scenario(self, name: str) -> list[int]:
        """Runs a named test kernel; its first 256 output values (-99 where unwritten)."""
        out = (ctypes.c_longlong * 256)(*([-99] * 256))
        error = ctypes.create_string_buffer(_ERROR_SIZE)
        self._check(self.lib.bspf_probe_scenario(name.encode(), out, error, _ERROR_SIZE), error)
        return list(out)


@pytest.fixture(scope="session")
def probe(request) -> Probe:
    """The probe library of the plain emulation build."""
    return Probe(built("plain", request.config).probe)
