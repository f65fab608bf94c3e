"""Builds and loads the emulated CUDA module (tools/cuda_emulation/build.py).

A build is made once per variant and pytest session and cached in pytest's cache
folder (keyed by the sources and flags), so reruns only relink or load. Without a
compiler, or without the sanitizer runtime a variant needs, the tests skip, except in
CI (BSPF_REQUIRE_CUDA_EMULATION=1) where they fail. A compile error in csrc/cuda always
fails.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools" / "cuda_emulation"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import build as emulation_build  # noqa: E402  (tools/cuda_emulation/build.py)

REQUIRED = os.environ.get("BSPF_REQUIRE_CUDA_EMULATION") == "1"

_outcomes: dict[str, object] = {}  # variant -> Built or the exception its build raised
_modules: dict[Path, object] = {}


def cache_folder(config=None) -> Path:
    """pytest's cache folder when there is one, else one under the temp dir."""
    if config is not None and getattr(config, "cache", None) is not None:
        return Path(config.cache.mkdir("bspf_cuda_emulation"))
    return Path(tempfile.gettempdir()) / f"bspf_cuda_emulation-{os.getuid()}"


def built(variant: str = "plain", config=None) -> emulation_build.Built:
    """The variant's build, made on first use; skips or fails the calling test if it can't be."""
    if variant not in _outcomes:
        try:
            _outcomes[variant] = emulation_build.build(variant, out=cache_folder(config))
        except emulation_build.BuildError as e:
            _outcomes[variant] = e
    outcome = _outcomes[variant]
    if isinstance(outcome, emulation_build.SanitizerUnavailable):
        if REQUIRED:
            pytest.fail(f"BSPF_REQUIRE_CUDA_EMULATION=1 but the {variant} build is impossible: {outcome}")
        pytest.skip(f"the compiler cannot build the {variant} emulation: {outcome}")
    if isinstance(outcome, Exception):
        pytest.fail(f"building the emulated CUDA sources ({variant}) failed:\n{outcome}", pytrace=False)
    return outcome


def load_cuda_module(path: Path):
    """Imports a `_cuda` extension module from a build folder (not as bspf_ext._cuda)."""
    path = Path(path)
    if path not in _modules:
        spec = importlib.util.spec_from_file_location("bspf_cuda_emulated._cuda", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[path] = module
    return _modules[path]


@pytest.fixture(scope="session")
def emulated_cuda(request):
    """The emulated `_cuda` module (plain build)."""
    return load_cuda_module(built("plain", request.config).cuda_module)
