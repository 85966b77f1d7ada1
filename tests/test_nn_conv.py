"""Conv2d module: gradient check, parity with torch.nn.Conv2d, torch's init, clear errors."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.nn.conv import Conv2d
from npdiffusion.testing import gradcheck, noncontiguous
from parity import assert_parity, randomize_


@given(k=st.sampled_from([1, 3, (1, 3), (3, 1)]), stride=st.sampled_from([1, 2]), padding=st.integers(0, 2),
       c=st.integers(1, 3), o=st.integers(1, 3), side=st.integers(3, 6), bias=st.booleans())
def test_conv2d_module_gradcheck(backend, k, stride, padding, c, o, side, bias):
    m = Conv2d(c, o, k, stride=stride, padding=padding, bias=bias).to("float64")
    x = noncontiguous(np.random.default_rng(side * 10 + c).standard_normal((2, c, side, side + 1)))
    report = gradcheck(m, x, full_max=30)
    assert report.passed, report


CONFIGS = [  # (in, out, kernel, stride, padding, bias, input shape)
    (4, 6, 3, 1, 1, True, (2, 4, 8, 8)),          # U-Net / VAE 3x3 convs
    (4, 4, 3, 2, 1, True, (2, 4, 9, 7)),          # U-Net downsampler
    (3, 5, 3, 2, 0, True, (2, 3, 9, 9)),          # VAE downsampler (after its pad)
    (6, 3, 1, 1, 0, True, (3, 6, 5, 4)),          # 1x1 shortcut / proj_in
    (3, 2, (1, 3), (2, 1), (0, 1), False, (1, 3, 6, 5)),
    (2, 3, 2, 1, 2, False, (2, 2, 3, 3)),
]


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_conv2d_parity_with_torch(backend, cfg, dtype, rtol):
    cin, cout, k, s, p, bias, shape = cfg
    theirs = randomize_(torch.nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=bias), seed=len(shape) + cin)
    x = np.random.default_rng(cin * cout).standard_normal(shape)
    assert_parity(Conv2d(cin, cout, k, stride=s, padding=p, bias=bias), theirs, [x], dtype=dtype, rtol=rtol)


def test_conv2d_parameter_gradients_accumulate(backend):
    m = Conv2d(2, 3, 3, padding=1).to("float64")
    x = asarray(np.random.default_rng(0).standard_normal((1, 2, 4, 4)))
    dy = asarray(np.random.default_rng(1).standard_normal((1, 3, 4, 4)))
    m.forward(x)
    m.backward(dy)
    once = {k: to_numpy(v).copy() for k, v in m.named_grads()}
    m.forward(x)
    m.backward(dy)
    for name, g in m.named_grads():
        np.testing.assert_allclose(to_numpy(g), 2 * once[name], rtol=1e-12)


def test_conv2d_state_dict_matches_torch():
    ours, theirs = Conv2d(3, 5, (3, 1)), torch.nn.Conv2d(3, 5, (3, 1))
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
    assert list(Conv2d(3, 5, 1, bias=False).state_dict()) == ["weight"]


def test_conv2d_default_init_is_torch_uniform_fan_in():
    m = Conv2d(8, 16, 3)
    bound = 1 / math.sqrt(8 * 9)
    w, b = to_numpy(m.weight), to_numpy(m.bias)
    assert w.dtype == np.float32 and w.shape == (16, 8, 3, 3) and b.shape == (16,)
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    # U(-a, a) has standard deviation a / sqrt(3); 1152 draws pin it to a few percent.
    assert abs(w.std() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
    assert abs(w.mean()) < 0.1 * bound


def test_conv2d_eval_keeps_nothing_for_backward(backend):
    m = Conv2d(2, 2, 3, padding=1).eval()
    m(asarray(np.zeros((1, 2, 4, 4), dtype=np.float32)))
    with pytest.raises(RuntimeError, match="needs a forward in training mode"):
        m.backward(asarray(np.zeros((1, 2, 4, 4), dtype=np.float32)))


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((0, 2, 3), {}, ValueError, "in_channels must be a positive int, got 0"),
    ((2, -1, 3), {}, ValueError, "out_channels must be a positive int, got -1"),
    ((2, 2, 0), {}, ValueError, "kernel_size must be a positive int or a pair of positive ints, got 0"),
    ((2, 2, (3, 3, 3)), {}, TypeError, r"kernel_size must be .* got \(3, 3, 3\)"),
    ((2, 2, 3), {"stride": 0}, ValueError, "stride must be a positive int or a pair"),
    ((2, 2, 3), {"stride": 1.0}, TypeError, "stride must be a positive int or a pair"),
    ((2, 2, 3), {"padding": -1}, ValueError, "padding must be a non-negative int or a pair"),
    ((2, 2, 3), {"padding": "same"}, TypeError, "padding must be a non-negative int or a pair"),
])
def test_conv2d_rejects_bad_constructor_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Conv2d(*args, **kwargs)


def test_conv2d_rejects_bad_inputs(backend):
    m = Conv2d(3, 2, 3)
    with pytest.raises(ValueError, match=r"Conv2d: x must have 4 dimensions, got shape \(3, 8, 8\)"):
        m(asarray(np.zeros((3, 8, 8), dtype=np.float32)))
    with pytest.raises(ValueError, match=r"Conv2d: x must have 3 entries on axis 1, got shape \(1, 4, 8, 8\)"):
        m(asarray(np.zeros((1, 4, 8, 8), dtype=np.float32)))
    with pytest.raises(ValueError, match=r"x is too small for the kernel: padded size \(2, 8\) < kernel_size"):
        m(asarray(np.zeros((1, 3, 2, 8), dtype=np.float32)))
    with pytest.raises(TypeError, match="Conv2d: x must be an array, got list"):
        m([[1.0]])
