"""npdiffusion.parallel: blocks cover the range exactly, results come back in order, errors surface,
and the ops that use it give the same arrays with any thread count and block size as in one call."""
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion import parallel
from npdiffusion.ops.norm import group_norm_backward, group_norm_forward


@pytest.fixture
def forced(monkeypatch):
    """Split even tiny arrays, into small blocks, over three threads."""
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ENTRIES", 0)
    monkeypatch.setattr(parallel, "BLOCK_ENTRIES", 64)
    previous = parallel.get_num_threads()
    parallel.set_num_threads(3)
    yield
    parallel.set_num_threads(previous)


@given(n=st.integers(0, 200), row=st.integers(1, 5000), threads=st.integers(1, 8),
       block=st.integers(1, 1 << 16))
def test_blocks_cover_the_range_in_order(n, row, threads, block):
    spans = parallel.blocks(n, row, threads, block)
    if n == 0:
        assert spans == []
        return
    assert [lo for lo, _ in spans] == [0] + [hi for _, hi in spans[:-1]]
    assert (spans[-1][1] if spans else 0) == n
    sizes = [hi - lo for lo, hi in spans]
    assert all(size >= 1 for size in sizes)
    if sizes:
        assert max(sizes) - min(sizes) <= 1
        assert len(spans) >= min(threads, n)


def test_results_come_back_in_block_order(forced):
    out = parallel.parallel_for(lambda lo, hi: list(range(lo, hi)), 100, 1)
    assert [i for block in out for i in block] == list(range(100))
    assert len(out) == len(parallel.blocks(100, 1, 3)) >= 3


def test_a_block_error_reaches_the_caller(forced):
    def fn(lo, hi):
        if lo > 0:
            raise RuntimeError(f"block {lo}")
        return lo

    with pytest.raises(RuntimeError, match="block"):
        parallel.parallel_for(fn, 50, 1)


def test_nested_calls_run_inline(forced):
    def inner(lo, hi):
        return threading.current_thread().name

    def outer(lo, hi):
        return set(parallel.parallel_for(inner, 10, 1)) == {threading.current_thread().name}

    assert all(parallel.parallel_for(outer, 10, 1))


def test_one_thread_is_one_call(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ENTRIES", 0)
    parallel.set_num_threads(1)
    try:
        assert parallel.parallel_for(lambda lo, hi: (lo, hi), 40, 1 << 20) == [(0, 40)]
    finally:
        parallel.set_num_threads(parallel._default_threads())


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_num_threads_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="num_threads"):
        parallel.set_num_threads(bad)


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("NPDIFFUSION_NUM_THREADS", "3")
    assert parallel._default_threads() == 3
    monkeypatch.setenv("NPDIFFUSION_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="NPDIFFUSION_NUM_THREADS"):
        parallel._default_threads()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0.0, 1e4])  # 1e4: |mu| >> sigma, the two-pass path in some blocks
def test_group_norm_blocks_equal_one_call(forced, dtype, offset):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 12, 5, 3)) + offset * (rng.random((7, 1, 1, 1)) > 0.5)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w, b = rng.standard_normal(12).astype(dtype), rng.standard_normal(12).astype(dtype)
    y_par, cache = group_norm_forward(x, 4, w, b)
    grads_par = group_norm_backward(dy, cache)
    parallel.set_num_threads(1)
    y_one, cache = group_norm_forward(x, 4, w, b)
    grads_one = group_norm_backward(dy, cache)
    np.testing.assert_array_equal(y_par, y_one)
    for got, want in zip(grads_par, grads_one):
        np.testing.assert_array_equal(got, want)
