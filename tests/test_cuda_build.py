"""The CUDA module is built whenever nvcc was found, imports without a GPU, driver or
torch, and reports problems as Python errors. Runs on CPU-only machines too: CI has nvcc
but no GPU, so this is where a silently skipped CUDA build fails."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import bspf_ext
from bspf_ext import _backends, _build_info


def nvcc_present() -> bool:
    return bool(os.environ.get("CUDACXX")) or shutil.which("nvcc") is not None


def test_cuda_module_built_when_nvcc_present():
    if not nvcc_present():
        pytest.skip("no nvcc: a CPU-only build is expected")
    if not _build_info.CUDA_REQUESTED:
        pytest.skip("built with BSPF_WITH_CUDA=OFF")
    assert _build_info.CUDA_BUILT, "nvcc is present but bspf_ext was built without its CUDA module"
    assert bspf_ext.has_cuda_build()


def test_build_info_agrees_with_the_installed_modules():
    assert bspf_ext.has_cuda_build() == _build_info.CUDA_BUILT


@pytest.mark.skipif(not _build_info.CUDA_BUILT, reason="built without CUDA")
def test_cuda_module_imports_without_torch_or_cudart():
    # Static CUDA runtime and no libtorch: the module loads with torch blocked and an
    # empty library path, and says how big a problem it could take.
    code = (
        "import sys, importlib.util, pathlib\n"
        "sys.modules['torch'] = None\n"
        "spec = importlib.util.find_spec('bspf_ext')\n"
        "folder = pathlib.Path(spec.submodule_search_locations[0])\n"
        "path = next(folder.glob('_cuda*.so'))\n"
        "module_spec = importlib.util.spec_from_file_location('bspf_ext._cuda', path)\n"
        "module = importlib.util.module_from_spec(module_spec)\n"
        "module_spec.loader.exec_module(module)\n"
        "print(module.shared_bytes(module.DType.bfloat16, 16, 197))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 0


@pytest.mark.skipif(not _build_info.CUDA_BUILT, reason="built without CUDA")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_launch_without_a_gpu_raises_runtime_error():
    from bspf_ext import _cuda

    params = _cuda.ForwardParams()
    params.p.batch, params.p.heads, params.p.seqlen, params.p.head_dim, params.p.value_dim = 1, 1, 4, 2, 2
    # Placeholder addresses: the call must stop at the device check, before any access.
    params.qk = params.v = params.score_kernel = params.out = 256
    saved = _cuda.Saved()
    saved.mask_words = saved.match = saved.rho = saved.lse = saved.row_sum = 256
    params.saved = saved
    with pytest.raises(RuntimeError, match="CUDA"):
        _cuda.forward(params, 0, 0)


@pytest.mark.skipif(not _build_info.CUDA_BUILT, reason="built without CUDA")
def test_bad_arguments_raise_value_error():
    from bspf_ext import _cuda

    params = _cuda.ForwardParams()
    params.p.batch, params.p.heads, params.p.seqlen, params.p.head_dim = 1, 1, 4, 2
    params.p.block_size = 65
    with pytest.raises(ValueError, match="block_size"):
        _cuda.forward(params, 0, 0)
    params.p.block_size = 16
    with pytest.raises(ValueError, match="qk is null"):
        _cuda.mask(params, 0, 0)


def test_cuda_tensor_without_cuda_build_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_backends, "has_cuda_build", lambda: False)
    with pytest.raises(RuntimeError, match="built without CUDA support"):
        _backends.require_cuda(torch.empty(0))
