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
from bspf_ext import _build_info
from bspf_ext.ops import backends as _backends


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
    saved.mask_words = saved.match = saved.rho = saved.lse = saved.log_row_sum = 256
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
        _backends.require_cuda()


# ------------------------------------------------------------- driver compatibility


@pytest.fixture
def fake_versions(monkeypatch):
    """Sets the versions the driver check sees: fake_versions(driver, runtime). The cached
    verdict is cleared around the test so the real one is recomputed afterwards."""
    from bspf_ext import _cuda

    def set_versions(driver, runtime):
        monkeypatch.setattr(_cuda, "driver_version", lambda: driver)
        monkeypatch.setattr(_cuda, "runtime_version", lambda: runtime)
        _backends._cuda_driver_problem.cache_clear()

    yield set_versions
    _backends._cuda_driver_problem.cache_clear()


@pytest.mark.skipif(not _build_info.CUDA_BUILT, reason="built without CUDA")
def test_version_bindings_return_cuda_versions():
    from bspf_ext import _cuda

    major, minor = (int(x) for x in _build_info.CUDA_COMPILER_VERSION.split(".")[:2])
    assert _cuda.runtime_version() == 1000 * major + 10 * minor  # the toolkit that built it
    driver = _cuda.driver_version()
    assert isinstance(driver, int)
    if torch.cuda.is_available():
        assert driver >= 1000
    else:
        assert driver == 0 or driver >= 1000  # 0: no driver installed (CI)


def test_older_driver_message_names_both_versions_and_the_rebuild():
    message = _backends.driver_mismatch_message(12040, 13000)
    assert "CUDA 13.0" in message and "CUDA 12.4" in message
    assert "pip install --no-build-isolation ." in message
    assert "CUDACXX=/usr/local/cuda-" in message
    assert "insufficient driver" in message


@pytest.mark.parametrize("driver", [13000, 13020, 14000])
def test_same_or_newer_driver_is_fine(driver):
    assert _backends.driver_mismatch_message(driver, 13000) is None


def test_older_minor_version_is_fine():
    # CUDA's minor-version compatibility: a 13.1 runtime runs on a 13.0 driver.
    assert _backends.driver_mismatch_message(13000, 13010) is None


def test_no_driver_leaves_the_no_gpu_error_to_the_kernels():
    assert _backends.driver_mismatch_message(0, 13000) is None


@pytest.mark.skipif(not _build_info.CUDA_BUILT, reason="built without CUDA")
def test_cuda_call_on_an_older_driver_raises_with_both_versions(fake_versions):
    fake_versions(12040, 13000)
    with pytest.raises(RuntimeError, match=r"built with CUDA 13\.0.*supports CUDA 12\.4"):
        _backends.require_cuda()
    # The ops' CUDA kernels check too (torch.ops.bspf_ext.* bypasses require_cuda); the
    # check comes first, so placeholder arguments never reach the kernels.
    from bspf_ext.ops import cuda as _cuda_ops

    with pytest.raises(RuntimeError, match="insufficient driver"):
        _cuda_ops._forward_cuda(None, None, None, 16, 0.5, True, 1.0)
    with pytest.raises(RuntimeError, match="insufficient driver"):
        _cuda_ops._block_mask_cuda(None, None, 16, 0.5, 1.0)
    with pytest.raises(RuntimeError, match="insufficient driver"):
        _cuda_ops._backward_cuda(*[None] * 8, 16, True, 1.0)


@pytest.mark.skipif(not _build_info.CUDA_BUILT, reason="built without CUDA")
@pytest.mark.parametrize("driver", [0, 13000, 13020])
def test_cuda_call_on_a_sufficient_or_absent_driver_passes_the_check(fake_versions, driver):
    fake_versions(driver, 13000)
    _backends.require_cuda()


@pytest.mark.skipif(not _build_info.CUDA_BUILT, reason="built without CUDA")
def test_driver_check_queries_the_versions_once(monkeypatch, fake_versions):
    from bspf_ext import _cuda

    fake_versions(12040, 13000)
    calls = []
    monkeypatch.setattr(_cuda, "driver_version", lambda: calls.append(1) or 12040)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            _backends.check_cuda_driver()
    assert len(calls) == 1
