"""Group norm and layer norm ops: gradient checks, torch equality, the two-pass fallback, errors."""
import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import npdiffusion.ops.norm as norm_ops
from npdiffusion.backend import asarray, to_numpy
from npdiffusion.ops.norm import group_norm_backward, group_norm_forward, layer_norm_backward, layer_norm_forward
from npdiffusion.testing import gradcheck_op, noncontiguous, relative_error


# Central-difference step: 1e-5 balances truncation (~eps^2) against round-off (~1e-16/eps) for
# normalizations, whose single Jacobian entries can be small (the default 1e-6 hits ~2e-6 noise).
EPS = 1e-5


def draw_grouped(rng, shape, groups, axis_from=1, min_std=0.02):
    """Standard-normal x of ``shape``, redrawn until every normalized set has std >= min_std.

    Sets: for group norm (axis_from=1) each (batch, group); for layer norm each row of the last
    axes (groups=1, axis_from = first normalized axis)."""
    for _ in range(100):
        x = rng.standard_normal(shape) * rng.uniform(0.5, 2.0) + rng.uniform(-1.0, 1.0)
        lead = int(np.prod(shape[:axis_from], dtype=np.int64))
        if x.reshape(lead * groups, -1).std(axis=1).min() >= min_std:
            return x
    raise AssertionError("could not draw well-spread input")


gn_shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
                      st.lists(st.integers(1, 4), min_size=0, max_size=2), st.booleans(), st.booleans())


@given(gn_shapes)
def test_group_norm_op_gradcheck(backend, params):
    b, g, cg, spatial, has_w, has_b = params
    # Sets of 2 elements normalize to exactly +-1: their gradient is O(eps) and central differences
    # cannot resolve it. From 3 elements on the gradient is O(1).
    assume(cg * int(np.prod(spatial)) >= 3)
    rng = np.random.default_rng(b * 1000 + g * 100 + cg * 10 + len(spatial))
    shape = (b, g * cg, *spatial)
    x = noncontiguous(draw_grouped(rng, shape, g))
    w = asarray(rng.standard_normal(g * cg) + 1.0)
    bias = asarray(rng.standard_normal(g * cg))
    inputs = [x] + ([w] if has_w else []) + ([bias] if has_b else [])

    def forward(x, *params):
        wb = list(params)
        return group_norm_forward(x, g, wb.pop(0) if has_w else None, wb.pop(0) if has_b else None, eps=1e-5)

    def backward(dy, cache):
        dx, dw, db = group_norm_backward(dy, cache)
        assert (dw is None) == (not has_w) and (db is None) == (not has_b)
        return [dx] + ([dw] if has_w else []) + ([db] if has_b else [])

    report = gradcheck_op(forward, backward, inputs, full_max=24, eps=EPS)
    assert report.passed, report


ln_shapes = st.tuples(st.lists(st.integers(1, 3), min_size=0, max_size=2),
                      st.lists(st.integers(1, 4), min_size=1, max_size=2), st.booleans(), st.booleans())


@given(ln_shapes)
def test_layer_norm_op_gradcheck(backend, params):
    lead, norm_shape, has_w, has_b = params
    assume(int(np.prod(norm_shape)) >= 3)                  # see test_group_norm_op_gradcheck
    rng = np.random.default_rng(len(lead) * 100 + int(np.prod(norm_shape)))
    shape = (*lead, *norm_shape)
    x = noncontiguous(draw_grouped(rng, shape, 1, axis_from=len(lead)))
    w = asarray(rng.standard_normal(norm_shape) + 1.0)
    bias = asarray(rng.standard_normal(norm_shape))
    inputs = [x] + ([w] if has_w else []) + ([bias] if has_b else [])

    def forward(x, *params):
        wb = list(params)
        return layer_norm_forward(x, tuple(norm_shape), wb.pop(0) if has_w else None,
                                  wb.pop(0) if has_b else None, eps=1e-5)

    def backward(dy, cache):
        dx, dw, db = layer_norm_backward(dy, cache)
        return [dx] + ([dw] if has_w else []) + ([db] if has_b else [])

    report = gradcheck_op(forward, backward, inputs, full_max=24, eps=EPS)
    assert report.passed, report


def _torch_pair(fn, x, w, b, dy):
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = fn(tx, tw, tb)
    ty.backward(torch.tensor(dy))
    return [ty.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()]


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-5)])
@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 4), 3), ((3, 6), 2), ((2, 8, 3, 2, 2), 4), ((1, 32, 7), 32)])
def test_group_norm_op_equals_torch(backend, dtype, rtol, shape, groups):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 1.7 + 0.4).astype(dtype)
    w, b = rng.standard_normal((2, shape[1])).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y, cache = group_norm_forward(asarray(x), groups, asarray(w), asarray(b), eps=1e-6)
    ours = [y, *group_norm_backward(asarray(dy), cache)]
    theirs = _torch_pair(lambda t, tw, tb: torch.nn.functional.group_norm(t, groups, tw, tb, 1e-6), x, w, b, dy)
    for name, o, t in zip(("y", "dx", "dweight", "dbias"), ours, theirs):
        assert o.dtype == dtype, name
        assert relative_error(o, t) <= rtol, (name, relative_error(o, t))


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-5)])
@pytest.mark.parametrize("shape,k", [((2, 5, 8), 1), ((3, 4, 6), 2), ((7,), 1)])
def test_layer_norm_op_equals_torch(backend, dtype, rtol, shape, k):
    rng = np.random.default_rng(8)
    ns = shape[len(shape) - k:]
    x = (rng.standard_normal(shape) * 2.0 - 0.7).astype(dtype)
    w, b = (rng.standard_normal(ns).astype(dtype) for _ in range(2))
    dy = rng.standard_normal(shape).astype(dtype)
    y, cache = layer_norm_forward(asarray(x), ns, asarray(w), asarray(b))
    ours = [y, *layer_norm_backward(asarray(dy), cache)]
    theirs = _torch_pair(lambda t, tw, tb: torch.nn.functional.layer_norm(t, ns, tw, tb, 1e-5), x, w, b, dy)
    for name, o, t in zip(("y", "dx", "dweight", "dbias"), ours, theirs):
        assert relative_error(o, t) <= rtol, (name, relative_error(o, t))


@pytest.mark.parametrize("which", ["group", "layer"])
def test_large_offset_is_as_accurate_as_torch(backend, monkeypatch, which):
    """float32 data with |mean| = 3000 sigma: one-pass E[x^2] - mu^2 loses every digit of the
    variance (and x a - mu a of the output). With the corrected two-pass fallback, every output and
    gradient is at least as close to the float64 truth as torch's float32 result."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 4, 64)) * 0.1 + 300.0).astype(np.float32)
    dy = rng.standard_normal((2, 4, 64)).astype(np.float32)
    n = 4 if which == "group" else 64
    w = (rng.standard_normal(n) + 1.0).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)

    def ours(dtype):
        args = [asarray(a.astype(dtype)) for a in (x, w, b)]
        if which == "group":
            y, cache = group_norm_forward(args[0], 2, args[1], args[2])
            return [y, *group_norm_backward(asarray(dy.astype(dtype)), cache)]
        y, cache = layer_norm_forward(args[0], 64, args[1], args[2])
        return [y, *layer_norm_backward(asarray(dy.astype(dtype)), cache)]

    def torch_fn(t, tw, tb):
        if which == "group":
            return torch.nn.functional.group_norm(t, 2, tw, tb)
        return torch.nn.functional.layer_norm(t, (64,), tw, tb)

    truth = ours(np.float64)
    theirs = _torch_pair(torch_fn, x, w, b, dy)
    for name, o, t, ref in zip(("y", "dx", "dweight", "dbias"), ours(np.float32), theirs, truth):
        assert relative_error(o, ref) <= max(relative_error(t, ref), 1e-6), name
    monkeypatch.setattr(norm_ops, "_ONE_PASS_MAX_RATIO", float("inf"))   # one pass only: must fail
    if backend == "cupy":           # CuPy takes two passes for every row, without the check's sync
        assert relative_error(ours(np.float32)[0], truth[0]) <= 1e-4
    else:
        assert relative_error(ours(np.float32)[0], truth[0]) > 1e-2


def test_group_norm_zero_spatial_and_float16(backend):
    x = asarray(np.zeros((2, 4, 0), dtype=np.float32))
    y, cache = group_norm_forward(x, 2, asarray(np.ones(4, np.float32)), asarray(np.zeros(4, np.float32)))
    dx, dw, db = group_norm_backward(asarray(np.zeros((2, 4, 0), np.float32)), cache)
    assert y.shape == dx.shape == (2, 4, 0) and not np.any(to_numpy(dw)) and not np.any(to_numpy(db))
    rng = np.random.default_rng(0)
    x16 = rng.standard_normal((2, 4, 3, 3)).astype(np.float16)
    y16, cache = group_norm_forward(asarray(x16), 2)
    ref = group_norm_forward(asarray(x16.astype(np.float32)), 2)[0]
    assert y16.dtype == np.float16 and relative_error(y16, ref) < 1e-3
    assert group_norm_backward(asarray(x16), cache)[0].dtype == np.float16


def test_norm_op_errors(backend):
    x = asarray(np.zeros((2, 6, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="6 channels .* not divisible into num_groups=4"):
        group_norm_forward(x, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, \*spatial\), got shape \(6,\)"):
        group_norm_forward(asarray(np.zeros(6, np.float32)), 3)
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\), got \(3,\)"):
        group_norm_forward(x, 3, asarray(np.ones(3, np.float32)))
    with pytest.raises(TypeError, match="x must be a floating array"):
        group_norm_forward(asarray(np.zeros((2, 6), dtype=np.int64)), 3)
    with pytest.raises(ValueError, match=r"x must end with the normalized shape \(4,\), got shape \(2, 6, 3\)"):
        layer_norm_forward(x, 4)
