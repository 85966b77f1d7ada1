"""Shared test set-up: Hypothesis profiles, the backend fixture, offline Hugging Face libraries."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from npdiffusion.backend import get_backend, is_available, set_backend

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

# CI: derandomized, no example database, no deadline (shared 2-core machines are noisy).
settings.register_profile("ci", derandomize=True, deadline=None, database=None, max_examples=15,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("dev", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

BACKENDS = ["numpy", "cupy"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test once per backend; the CuPy case skips when this machine has no CUDA GPU."""
    name = request.param
    if not is_available(name):
        pytest.skip("the CuPy backend needs CuPy and a CUDA GPU, which this machine does not have")
    previous = get_backend()
    set_backend(name)
    yield name
    set_backend(previous)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
