"""Shared test set-up: Hypothesis profiles, the backend fixture, offline Hugging Face libraries."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from npdiffusion.backend import get_backend, is_available, set_backend

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

# "ci", the default: derandomized, no example database, no deadline (shared 2-core machines are
# noisy), so the README's test command gives the same result on every machine. "dev"
# (HYPOTHESIS_PROFILE=dev) draws new examples on each run to look for failures.
settings.register_profile("ci", derandomize=True, deadline=None, database=None, max_examples=15,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("dev", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = ["numpy", "cupy"]


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_xdist_worker():
    """Under pytest-xdist each worker owns one core: BLAS and torch threads would only fight.

    (On the 2-core CI machine a tiny torch forward/backward took ~3 s with two threads per worker
    and ~0.03 s with one.)
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    from npdiffusion import parallel

    previous = torch.get_num_threads(), parallel.get_num_threads()
    torch.set_num_threads(1)
    parallel.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(previous[0])
    parallel.set_num_threads(previous[1])


@pytest.fixture(autouse=True)
def _seeded_initialization():
    """Every test starts from the same parameter-initialization stream, so modules built without
    explicit weights get the same weights whatever ran before (xdist deals tests out differently
    on every run)."""
    from npdiffusion.random import manual_seed

    manual_seed(0)


# Without a GPU, the [cupy] cases run on the strict CPU stand-in for CuPy (npdiffusion/cupy_standin;
# docs/gpu.md, "The CuPy stand-in"), which refuses host/device mixing and counts host
# synchronizations as CuPy would; NPDIFFUSION_TEST_CUPY_STANDIN=0 skips them instead (.ci/run's
# baseline-kernel pass does: the stand-in's arithmetic is NumPy's, which the [numpy] half checks).
CUPY_STANDIN = os.environ.get("NPDIFFUSION_TEST_CUPY_STANDIN", "1") != "0"


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test once per backend. The CuPy case runs on real CuPy where a CUDA GPU is present,
    else on the CuPy stand-in (unless NPDIFFUSION_TEST_CUPY_STANDIN=0: then it skips)."""
    name = request.param
    previous = get_backend()
    if name == "cupy" and not is_available("cupy"):
        if not CUPY_STANDIN:
            pytest.skip("the CuPy cases without a GPU: NPDIFFUSION_TEST_CUPY_STANDIN=0 turned their CPU stand-in off")
        from npdiffusion import cupy_standin

        with cupy_standin.installed():
            set_backend("cupy")
            try:
                yield name
            finally:
                set_backend(previous)
        return
    set_backend(name)
    yield name
    set_backend(previous)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def quick_demo_model(tmp_path_factory):
    """The model folder of ``npdiffusion demo --quick`` (toy sizes, seconds), built once per test process."""
    from npdiffusion.training.demo import run_demo

    out = tmp_path_factory.mktemp("quickdemo")
    run_demo(str(out), quick=True, progress=False, log=lambda *a: None)
    return str(out / "model")


def pytest_terminal_summary(terminalreporter):
    """Every skip is shown in the run's summary, grouped by its reason, so a user sees what this
    machine could not check (the CuPy cases without a GPU, a torch kernel this CPU does not run)."""
    reasons = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        terminalreporter.section("what this machine skipped")
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            terminalreporter.line(f"{count:5d} skipped: {reason}")
