"""The backend policy of npdiffusion/parallel.py: thread splits and cache blocks on NumPy only; on
CuPy every element-wise op is one call (checked on the CuPy stand-in, issue #18)."""
import numpy as np
import pytest

from npdiffusion import cupy_standin, parallel
from npdiffusion.backend import asarray, get_backend, set_backend, to_numpy
from npdiffusion.ops import norm
from npdiffusion.ops.norm import group_norm_backward, group_norm_forward


@pytest.fixture(params=["numpy", "cupy"])
def policy_backend(request):
    previous = get_backend()
    if request.param == "numpy":
        set_backend("numpy")
        yield "numpy"
    else:
        with cupy_standin.installed():
            set_backend("cupy")
            try:
                yield "cupy"
            finally:
                set_backend(previous)
            return
    set_backend(previous)


def test_parallel_for_is_one_call_on_cupy(policy_backend, monkeypatch):
    monkeypatch.setattr(parallel, "get_num_threads", lambda: 4)
    n = 4 * parallel.MIN_PARALLEL_ENTRIES
    calls = []
    parallel.parallel_for(lambda lo, hi: calls.append((lo, hi)), n, 1, parallel.BLOCK_ENTRIES)
    blocks = parallel.cache_blocks(n, 1, parallel.BLOCK_ENTRIES)
    if policy_backend == "cupy":
        assert not parallel.cpu_tuned()
        assert calls == [(0, n)] and blocks == [(0, n)]
    else:
        assert parallel.cpu_tuned()
        assert len(calls) == len(blocks) == n // parallel.BLOCK_ENTRIES
        assert sorted(calls) == blocks
    assert parallel.parallel_for(lambda lo, hi: 1, 0, 1) == [] and parallel.cache_blocks(0, 1, 8) == []


def test_group_norm_backward_is_one_sub_block_on_cupy(policy_backend, monkeypatch):
    """Group norm's backward walks its samples in cache-sized sub-blocks on NumPy; on CuPy one."""
    monkeypatch.setattr(parallel, "get_num_threads", lambda: 1)
    seen = []
    real = parallel.cache_blocks
    monkeypatch.setattr(norm, "cache_blocks", lambda *a: seen.append(real(*a)) or seen[-1])
    rng = np.random.default_rng(0)
    b, c, s = 8, 64, 1024                         # 64 K entries per sample: two per sub-block on NumPy
    x = asarray(rng.standard_normal((b, c, s)).astype(np.float32))
    y, cache = group_norm_forward(x, 8, asarray(np.ones(c, np.float32)), asarray(np.zeros(c, np.float32)))
    dx, _, _ = group_norm_backward(asarray(rng.standard_normal((b, c, s)).astype(np.float32)), cache)
    assert np.isfinite(to_numpy(dx)).all()
    if policy_backend == "cupy":
        assert seen == [[(0, b)]]
    else:
        assert len(seen) >= 1 and all(len(blocks) > 1 for blocks in seen)
