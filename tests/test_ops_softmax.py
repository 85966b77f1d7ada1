"""softmax / log_softmax ops: gradient checks, parity with torch, masked rows, float16, errors."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.ops.softmax import (log_softmax_backward, log_softmax_forward, softmax_backward,
                                     softmax_forward)
from npdiffusion.testing import gradcheck_op, noncontiguous, relative_error

PAIRS = {"softmax": (softmax_forward, softmax_backward, torch.softmax),
         "log_softmax": (log_softmax_forward, log_softmax_backward, torch.log_softmax)}


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), data=st.data(),
       name=st.sampled_from(sorted(PAIRS)))
def test_softmax_ops_gradcheck(backend, shape, data, name):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    fwd, bwd, _ = PAIRS[name]
    x = noncontiguous(np.random.default_rng(sum(shape) + axis).standard_normal(shape) * 2.0)
    # floor 1e-3: central differences carry ~1e-10 absolute round-off, and a small probability has
    # derivatives far below 1e-3; larger ones are checked to 1e-6 relative, smaller to 1e-9 absolute.
    report = gradcheck_op(fwd, bwd, [x], axis=axis, full_max=30, eps=1e-5, floor=1e-3)
    assert report.passed, report


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-12), ("float32", 1e-6)])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_ops_match_torch(backend, name, dtype, rtol, axis):
    fwd, bwd, tfn = PAIRS[name]
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, 4, 5)) * 3).astype(dtype)
    dy = rng.standard_normal((3, 4, 5)).astype(dtype)
    y, cache = fwd(asarray(x), axis=axis)
    dx = bwd(asarray(dy), cache)
    t = torch.tensor(x, requires_grad=True)
    ty = tfn(t, axis)
    ty.backward(torch.tensor(dy))
    assert y.dtype == dx.dtype == np.dtype(dtype)
    assert relative_error(y, ty.detach().numpy()) <= rtol
    assert relative_error(dx, t.grad.numpy()) <= rtol


def test_softmax_is_stable_for_huge_logits(backend):
    x = asarray(np.array([[1000.0, 999.0, -1000.0], [-5e4, -5e4 - 1.0, -5e4]], dtype=np.float32))
    y, _ = softmax_forward(x)
    ly, _ = log_softmax_forward(x)
    expected = torch.softmax(torch.tensor(to_numpy(x), dtype=torch.float64), -1).numpy()
    assert np.all(np.isfinite(to_numpy(y))) and np.all(np.isfinite(to_numpy(ly)))
    assert relative_error(y, expected) <= 1e-6
    assert relative_error(np.exp(to_numpy(ly).astype(np.float64)), expected) <= 1e-6


def test_fully_masked_rows_give_zeros_not_nan(backend):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4))
    x[1] = -np.inf
    x[2, :2] = -np.inf
    dy = rng.standard_normal((3, 4))
    y, cache = softmax_forward(asarray(x))
    dx = to_numpy(softmax_backward(asarray(dy), cache))
    y = to_numpy(y)
    assert np.array_equal(y[1], np.zeros(4)) and np.array_equal(dx[1], np.zeros(4))
    np.testing.assert_allclose(y[[0, 2]].sum(-1), 1.0, rtol=1e-15)
    assert np.array_equal(y[2, :2], [0.0, 0.0]) and np.all(np.isfinite(dx))
    # partially masked rows match torch (which is NaN only on the fully masked row)
    t = torch.tensor(x, requires_grad=True)
    ty = torch.softmax(t, -1)
    ty.backward(torch.tensor(dy))
    for r in (0, 2):
        np.testing.assert_allclose(y[r], ty[r].detach().numpy(), rtol=1e-13)
        np.testing.assert_allclose(dx[r], t.grad[r].numpy(), rtol=1e-12, atol=1e-15)
    ly, lcache = log_softmax_forward(asarray(x))
    ldx = to_numpy(log_softmax_backward(asarray(dy), lcache))
    assert np.all(to_numpy(ly)[1] == -np.inf) and np.all(np.isfinite(ldx))
    np.testing.assert_array_equal(ldx[1], dy[1])   # the -inf log-sum-exp is a constant


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_float16_is_computed_in_float32(backend, name):
    fwd, bwd, tfn = PAIRS[name]
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 9)) * 4).astype(np.float16)
    dy = rng.standard_normal((4, 9)).astype(np.float16)
    y, cache = fwd(asarray(x))
    dx = bwd(asarray(dy), cache)
    assert y.dtype == dx.dtype == np.float16
    t = torch.tensor(x.astype(np.float32), requires_grad=True)
    ty = tfn(t, -1)
    ty.backward(torch.tensor(dy.astype(np.float32)))
    # one float16 rounding of the float32 result (plus, for the gradient, of the float16 cached y)
    assert relative_error(y, ty.detach().numpy()) <= 1e-3
    assert relative_error(dx, t.grad.numpy()) <= 5e-3


def test_softmax_errors(backend):
    x = asarray(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"axis must be an int in \[-2, 2\), got 2"):
        softmax_forward(x, axis=2)
    with pytest.raises(ValueError, match="axis must be an int"):
        log_softmax_forward(x, axis=1.0)
    with pytest.raises(TypeError, match="x must be a floating array, got dtype int64"):
        softmax_forward(asarray(np.zeros((2, 3), dtype=np.int64)))
    with pytest.raises(ValueError, match="at least one dimension"):
        softmax_forward(asarray(np.float64(1.0)))
