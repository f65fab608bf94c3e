import os

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
