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
    """Split even tiny arrays over three threads."""
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ENTRIES", 0)
    previous = parallel.get_num_threads()
    parallel.set_num_threads(3)
    yield
    parallel.set_num_threads(previous)


@given(n=st.integers(0, 300), row=st.integers(1, 50), block=st.one_of(st.none(), st.integers(1, 400)))
def test_results_come_back_in_order(n, row, block):
    previous = parallel.get_num_threads()
    parallel.set_num_threads(3)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(parallel, "MIN_PARALLEL_ENTRIES", 0)
            out = parallel.parallel_for(lambda lo, hi: list(range(lo, hi)), n, row, block)
    finally:
        parallel.set_num_threads(previous)
    assert [i for part in out for i in part] == list(range(n))
    assert all(part for part in out)
    if block is not None:
        assert all(len(part) <= max(1, block // row) for part in out)
    elif n:
        rows = -(-n // (3 * parallel.CLAIMS_PER_THREAD))    # about CLAIMS_PER_THREAD per thread
        assert [len(part) for part in out[:-1]] == [rows] * (len(out) - 1)


class _AbsentPool:
    """A pool whose threads never start: the calling thread must claim every block itself."""

    def __init__(self):
        self.submitted = 0

    def submit(self, fn, *args):
        self.submitted += 1


def test_the_caller_claims_what_the_pool_does_not_start(forced, monkeypatch):
    pool = _AbsentPool()
    monkeypatch.setattr(parallel, "_pool", lambda size: pool)
    out = parallel.parallel_for(lambda lo, hi: (lo, hi, threading.current_thread().name), 30, 1, 4)
    assert pool.submitted == 2
    assert [(lo, hi) for lo, hi, _ in out] == [(lo, min(lo + 4, 30)) for lo in range(0, 30, 4)]
    assert {name for _, _, name in out} == {threading.current_thread().name}


@pytest.mark.parametrize("length, buffer", [(parallel.LONG_ROW, parallel.LONG_ROW), (3000, 2992),
                                            (parallel.LONG_ROW - 1, np.getbufsize()),
                                            (None, np.getbufsize()), (1 << 20, np.getbufsize())])
def test_long_rows_get_a_row_sized_ufunc_buffer(forced, length, buffer):
    before = np.getbufsize()
    seen = parallel.parallel_for(lambda lo, hi: np.getbufsize(), 6, 1, row_length=length)
    assert set(seen) == {buffer}
    assert np.getbufsize() == before


def test_a_block_error_reaches_the_caller(forced):
    def fn(lo, hi):
        if lo > 0:
            raise RuntimeError(f"block {lo}")
        return lo

    with pytest.raises(RuntimeError, match="block"):
        parallel.parallel_for(fn, 50, 1)


def test_pool_threads_follow_the_callers_errstate(forced):
    """numpy.errstate is per thread: the pool's threads take the caller's, so a pipeline that silences
    overflow warnings (it reports NaN/inf itself) prints none from them either."""
    caller = threading.current_thread().name
    pool_ran = threading.Event()

    def fn(lo, hi):
        name = threading.current_thread().name
        if name == caller:
            pool_ran.wait(timeout=10)                      # leave a block for a pool thread
        else:
            pool_ran.set()
        return name, np.geterr()["over"]

    with np.errstate(over="ignore"):
        out = parallel.parallel_for(fn, 6, 1)
    assert any(name != caller for name, _ in out)
    assert {mode for _, mode in out} == {"ignore"}
    assert np.geterr()["over"] == "warn"


def test_nested_calls_run_inline(forced):
    def inner(lo, hi):
        return threading.current_thread().name

    def outer(lo, hi):
        return set(parallel.parallel_for(inner, 10, 1)) == {threading.current_thread().name}

    assert all(parallel.parallel_for(outer, 10, 1))


def test_one_thread_is_one_call(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ENTRIES", 0)
    previous = parallel.get_num_threads()
    parallel.set_num_threads(1)
    try:
        assert parallel.parallel_for(lambda lo, hi: (lo, hi), 40, 1 << 20) == [(0, 40)]
    finally:
        parallel.set_num_threads(previous)


def test_one_thread_is_one_call_restores_the_previous_count(monkeypatch):
    """Guards the test above: it must give back the count it found, not the default."""
    previous = parallel.get_num_threads()
    parallel.set_num_threads(previous + 2)
    try:
        test_one_thread_is_one_call(monkeypatch)
        assert parallel.get_num_threads() == previous + 2
    finally:
        parallel.set_num_threads(previous)


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


def _assert_group_norm_equals_one_call(monkeypatch, x, w, b, dy):
    """Group norm (4 groups) forward and backward under the blocking set up now equal, bit for bit,
    one call on one thread with no blocks."""
    from npdiffusion.ops import norm

    y_blocked, cache = group_norm_forward(x, 4, w, b)
    grads_blocked = group_norm_backward(dy, cache)
    parallel.set_num_threads(1)                                                 # one call: no blocks
    monkeypatch.setattr(norm, "_GROUP_NORM_BLOCK", 1 << 30)
    monkeypatch.setattr(norm, "_CACHE_ENTRIES", 1 << 30)
    y_one, cache = group_norm_forward(x, 4, w, b)
    grads_one = group_norm_backward(dy, cache)
    np.testing.assert_array_equal(y_blocked, y_one)
    for got, want in zip(grads_blocked, grads_one):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0.0, 1e4])  # 1e4: |mu| >> sigma, the two-pass path in some blocks
@pytest.mark.parametrize("side", [3, 40])    # 40 x 40 = 1600 >= LONG_ROW: a row-sized ufunc buffer
def test_group_norm_blocks_equal_one_call(forced, monkeypatch, dtype, offset, side):
    from npdiffusion.ops import norm

    monkeypatch.setattr(norm, "_GROUP_NORM_BLOCK", 2 * 12 * side * side)       # two samples a block
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 12, side, side))
         + offset * (rng.random((7, 1, 1, 1)) > 0.5)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w, b = rng.standard_normal(12).astype(dtype), rng.standard_normal(12).astype(dtype)
    _assert_group_norm_equals_one_call(monkeypatch, x, w, b, dy)


@pytest.mark.parametrize("sub_samples", [1, 2])   # sub-blocks inside blocks of 3 samples (2: uneven)
def test_group_norm_sub_blocks_equal_one_call(forced, monkeypatch, sub_samples):
    from npdiffusion.ops import norm

    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 12, 5, 5)) * 1.5 + 0.3
    dy = rng.standard_normal(x.shape)
    w, b = rng.standard_normal(12), rng.standard_normal(12)
    per_sample = 12 * 5 * 5
    monkeypatch.setattr(norm, "_GROUP_NORM_BLOCK", 3 * per_sample)
    monkeypatch.setattr(norm, "_CACHE_ENTRIES", sub_samples * per_sample)
    _assert_group_norm_equals_one_call(monkeypatch, x, w, b, dy)


def _activation_cases():
    from npdiffusion.ops import activations as act
    from npdiffusion.ops.geglu import geglu_backward, geglu_forward

    return {
        "silu": (act.silu_forward, act.silu_backward),
        "gelu": (act.gelu_forward, act.gelu_backward),
        "gelu_tanh": (lambda x: act.gelu_forward(x, "tanh"), act.gelu_backward),
        "quick_gelu": (act.quick_gelu_forward, act.quick_gelu_backward),
        "geglu": (geglu_forward, geglu_backward),
    }


@pytest.mark.parametrize("name", sorted(_activation_cases()))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_element_wise_ops_blocks_equal_one_call(forced, monkeypatch, name, dtype):
    from npdiffusion.ops import activations, geglu

    forward, backward = _activation_cases()[name]
    for module in (activations, geglu):
        monkeypatch.setattr(module, "BLOCK_ENTRIES", 10)
    rng = np.random.default_rng(1)
    x = (4 * rng.standard_normal((5, 7, 12))).astype(dtype)[:, ::2]   # non-contiguous
    y_par, cache = forward(x)
    dy = rng.standard_normal(y_par.shape).astype(dtype)
    dx_par = backward(dy, cache)
    parallel.set_num_threads(1)                                                 # one call: no blocks
    for module in (activations, geglu):
        monkeypatch.setattr(module, "BLOCK_ENTRIES", 1 << 30)
    y_one, cache = forward(x)
    dx_one = backward(dy, cache)
    assert y_par.dtype == dx_par.dtype == dtype
    np.testing.assert_array_equal(y_par, y_one)
    np.testing.assert_array_equal(dx_par, dx_one)


def test_adamw_blocks_equal_one_call(forced, monkeypatch):
    from npdiffusion.nn import Linear
    from npdiffusion.optim import adamw

    rng = np.random.default_rng(2)
    results = []
    for threads, block in ((3, 7), (1, 1 << 30)):                               # blocks, then one call
        parallel.set_num_threads(threads)
        monkeypatch.setattr(adamw, "BLOCK_ENTRIES", block)
        layer = Linear(6, 5)
        layer.load_state_dict({"weight": rng.standard_normal((5, 6)) if not results else w0,
                               "bias": rng.standard_normal(5) if not results else b0})
        if not results:
            w0, b0 = layer.weight.copy(), layer.bias.copy()
        opt = adamw.AdamW(layer, lr=0.1)
        for step in range(3):
            layer.zero_grad()
            layer.forward(np.linspace(-1, 1, 12).reshape(2, 6).astype(np.float32) * (step + 1))
            layer.backward(np.ones((2, 5), np.float32))
            opt.step()
        results.append((layer.weight.copy(), layer.bias.copy()))
    for got, want in zip(*results):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(results[0][0], w0)
