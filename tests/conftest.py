import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Bounded example counts keep the suite inside CI's budget on a 2-core machine;
# BSPF_HYPOTHESIS_PROFILE=thorough draws many more.
settings.register_profile(
    "default", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("BSPF_HYPOTHESIS_PROFILE", "default"))


def _torchvision_for_timm() -> None:
    """timm imports torchvision at import time. Where the real torchvision is absent or does not
    load against this torch (pip's does not load against the local CPU build), the tests get
    tests/timm_support/torchvision, a stand-in with exactly the names timm imports
    (tests/timm_support/README.md). Nothing changes when timm is not installed."""
    if importlib.util.find_spec("timm") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or a RuntimeError from its operator registration
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.path.insert(0, str(Path(__file__).parent / "timm_support"))


_torchvision_for_timm()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
