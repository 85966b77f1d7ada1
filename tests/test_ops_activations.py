"""Activation and dropout ops: gradient checks, torch equality, stability, dropout statistics."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.ops.activations import (
    gelu_backward,
    gelu_forward,
    quick_gelu_backward,
    quick_gelu_forward,
    silu_backward,
    silu_forward,
)
from npdiffusion.ops.dropout import dropout_backward, dropout_forward
from npdiffusion.testing import gradcheck_op, noncontiguous, relative_error

OPS = {
    "silu": (silu_forward, silu_backward, torch.nn.functional.silu),
    "gelu": (gelu_forward, gelu_backward, torch.nn.functional.gelu),
    "gelu_tanh": (lambda x: gelu_forward(x, "tanh"), gelu_backward,
                  lambda t: torch.nn.functional.gelu(t, approximate="tanh")),
    "quick_gelu": (quick_gelu_forward, quick_gelu_backward, lambda t: t * torch.sigmoid(1.702 * t)),
}

# Central differences resolve a derivative only to ~1e-10 absolute (round-off of the summed loss
# over the step). GELU's Jacobian entries fall to ~1e-5 in the tails, so the element-wise probes
# use step 1e-5 and a floor of 1e-3 on the error's denominator: a wrong tail derivative (say a
# sign error on 6e-5) still shows as ~0.1, while round-off stays ~1e-7.
EPS, FLOOR = 1e-5, 1e-3

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3)


@pytest.mark.parametrize("name", list(OPS))
@given(shape=shapes, scale=st.sampled_from([0.5, 2.0, 4.0]))
def test_activation_op_gradcheck(backend, name, shape, scale):
    forward, backward, _ = OPS[name]
    x = noncontiguous(np.random.default_rng(len(shape) * 7 + int(scale)).standard_normal(shape) * scale)
    report = gradcheck_op(forward, backward, [x], full_max=24, eps=EPS, floor=FLOOR)
    assert report.passed, report


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-5)])
@pytest.mark.parametrize("name", list(OPS))
def test_activation_op_equals_torch(backend, name, dtype, rtol):
    forward, backward, theirs = OPS[name]
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 5, 6)) * 3.0).astype(dtype)
    dy = rng.standard_normal((4, 5, 6)).astype(dtype)
    y, cache = forward(asarray(x))
    dx = backward(asarray(dy), cache)
    tx = torch.tensor(x, requires_grad=True)
    ty = theirs(tx)
    ty.backward(torch.tensor(dy))
    assert y.dtype == dx.dtype == dtype
    assert relative_error(y, ty.detach().numpy()) <= rtol
    assert relative_error(dx, tx.grad.numpy()) <= rtol


@pytest.mark.parametrize("name", list(OPS))
def test_activation_extremes_are_finite_and_quiet(backend, name):
    forward, backward, theirs = OPS[name]
    x = np.array([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no overflow warnings from exp
        y, cache = forward(asarray(x))
        dx = backward(asarray(np.ones_like(x)), cache)
    tx = torch.tensor(x, requires_grad=True)
    ty = theirs(tx)
    ty.backward(torch.ones_like(tx))
    np.testing.assert_allclose(to_numpy(y), ty.detach().numpy(), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(to_numpy(dx), tx.grad.numpy(), rtol=1e-6, atol=1e-30)


def test_activations_keep_float16(backend):
    x = asarray(np.linspace(-4, 4, 9).astype(np.float16))
    for forward, backward, _ in OPS.values():
        y, cache = forward(x)
        assert y.dtype == np.float16 and backward(x, cache).dtype == np.float16


def test_activation_errors(backend):
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'erf'"):
        gelu_forward(asarray(np.zeros(3)), "erf")
    with pytest.raises(TypeError, match="silu: x must be a floating array, got int64"):
        silu_forward(asarray(np.zeros(3, np.int64)))


# --------------------------------------------------------------------------------- dropout
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), p=st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0]))
def test_dropout_op_gradcheck(backend, shape, p):
    x = noncontiguous(np.random.default_rng(len(shape)).standard_normal(shape))
    # A fresh generator with a fixed seed per call: every forward of the check draws the same mask.
    report = gradcheck_op(lambda x: dropout_forward(x, p, np.random.default_rng(11)), dropout_backward, [x],
                          full_max=24)
    assert report.passed, report


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_statistics_and_mask_reuse(backend, p):
    n = 200_000
    x = asarray(np.random.default_rng(0).uniform(1.0, 2.0, n))
    y, cache = dropout_forward(x, p, np.random.default_rng(1))
    y = to_numpy(y)
    kept = y != 0
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(kept.mean() - (1 - p)) < 5 * sigma                  # Bernoulli(1 - p) keeps
    np.testing.assert_allclose(y[kept], to_numpy(x)[kept] / (1 - p), rtol=1e-12)   # inverted scaling
    assert abs(y.mean() / to_numpy(x).mean() - 1) < 5 * np.sqrt(p / ((1 - p) * n)) * 1.2  # E[y] = x
    dy = np.random.default_rng(2).standard_normal(n)
    dx = to_numpy(dropout_backward(asarray(dy), cache))
    np.testing.assert_array_equal(dx != 0, kept)                   # the forward's mask, not a new one
    np.testing.assert_allclose(dx[kept], dy[kept] / (1 - p), rtol=1e-12)


def test_dropout_is_reproducible_across_dtypes_and_p_zero_draws_nothing(backend):
    x = np.random.default_rng(0).standard_normal((3, 50))
    y64, _ = dropout_forward(asarray(x), 0.3, np.random.default_rng(5))
    y32, _ = dropout_forward(asarray(x.astype(np.float32)), 0.3, np.random.default_rng(5))
    np.testing.assert_array_equal(to_numpy(y64) != 0, to_numpy(y32) != 0)
    assert y32.dtype == np.float32
    rng = np.random.default_rng(9)
    state = rng.bit_generator.state
    xb = asarray(x)
    y, cache = dropout_forward(xb, 0.0, rng)
    assert y is xb and rng.bit_generator.state == state           # identity, nothing drawn
    dy = asarray(np.ones_like(x))
    dx = dropout_backward(dy, cache)
    assert dx is not dy and np.array_equal(to_numpy(dx), x * 0 + 1)
    y, cache = dropout_forward(xb, 1.0, rng)
    assert not np.any(to_numpy(y)) and not np.any(to_numpy(dropout_backward(dy, cache)))


def test_dropout_errors(backend):
    x = asarray(np.zeros(3))
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 1.5"):
        dropout_forward(x, 1.5, np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator, got RandomState"):
        dropout_forward(x, 0.5, np.random.RandomState(0))
