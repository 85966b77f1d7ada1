"""Nearest upsampling and the VAE's right/bottom pad: torch agreement, gradient checks, errors, and
the diffusers Upsample2D / Downsample2D(padding=0) compositions they exist for."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.module import Module
from npdiffusion.nn.resample import PadRightBottom, UpsampleNearest2x
from npdiffusion.ops.resample import (
    nearest_indices,
    pad_right_bottom_backward,
    pad_right_bottom_forward,
    upsample_nearest2x_backward,
    upsample_nearest2x_forward,
    upsample_nearest_backward,
    upsample_nearest_forward,
)
from npdiffusion.testing import gradcheck, gradcheck_op, noncontiguous, relative_error
from parity import assert_parity, randomize_


def _torch_op(fn, x, seed=0):
    """torch's output and input gradient of fn(x) for a random upstream gradient."""
    xt = torch.tensor(x, requires_grad=True)
    yt = fn(xt)
    dy = np.random.default_rng(seed).standard_normal(tuple(yt.shape)).astype(x.dtype)
    yt.backward(torch.tensor(dy))
    return yt.detach().numpy(), dy, xt.grad.numpy()


# ----------------------------------------------------------------------------- nearest x2
@given(b=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 5), w=st.integers(1, 5))
def test_upsample_nearest2x_gradcheck(backend, b, c, h, w):
    x = noncontiguous(np.random.default_rng(h * 7 + w).standard_normal((b, c, h, w)))
    report = gradcheck_op(upsample_nearest2x_forward, upsample_nearest2x_backward, [x], full_max=60)
    assert report.passed, report


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_upsample_nearest2x_matches_torch(backend, dtype):
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype(dtype)
    y_t, dy, dx_t = _torch_op(lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest"), x)
    y, cache = upsample_nearest2x_forward(asarray(x))
    dx = upsample_nearest2x_backward(asarray(dy), cache)
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(to_numpy(y), y_t)                # a copy: exact
    assert relative_error(dx, dx_t) <= (1e-15 if dtype == np.float64 else 1e-6)


# ----------------------------------------------------------------------------- nearest to a size
def test_nearest_indices_match_torch_float32_exhaustively():
    """torch computes the source index in float32; every (in, out) pair up to 40 x 90 agrees."""
    for n_in in range(1, 41):
        t = torch.arange(n_in, dtype=torch.float32).reshape(1, 1, 1, n_in)
        for n_out in range(1, 91):
            theirs = F.interpolate(t, size=(1, n_out), mode="nearest").numpy().ravel().astype(np.int64)
            np.testing.assert_array_equal(nearest_indices(n_in, n_out), theirs, err_msg=f"{n_in} -> {n_out}")


@given(h=st.integers(1, 5), w=st.integers(1, 5), ho=st.integers(1, 11), wo=st.integers(1, 11))
def test_upsample_nearest_to_size_gradcheck(backend, h, w, ho, wo):
    x = noncontiguous(np.random.default_rng(h * w + ho).standard_normal((2, 2, h, w)))
    report = gradcheck_op(upsample_nearest_forward, upsample_nearest_backward, [x], full_max=50,
                          output_size=(ho, wo))
    assert report.passed, report


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
@pytest.mark.parametrize("shape,size", [((2, 3, 5, 4), (9, 7)), ((1, 2, 3, 3), (6, 6)), ((1, 2, 4, 6), (3, 13)),
                                        ((2, 1, 5, 5), (5, 5))])
def test_upsample_nearest_to_size_matches_torch(backend, shape, size, dtype, tol):
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    y_t, dy, dx_t = _torch_op(lambda t: F.interpolate(t, size=size, mode="nearest"), x)
    y, cache = upsample_nearest2x_forward(asarray(x), output_size=size)   # the Upsample2D entry point
    dx = upsample_nearest2x_backward(asarray(dy), cache)
    np.testing.assert_array_equal(to_numpy(y), y_t)
    assert dx.dtype == dtype and relative_error(dx, dx_t) <= tol


# ----------------------------------------------------------------------------- pad right/bottom
@given(b=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 5), w=st.integers(1, 5))
def test_pad_right_bottom_gradcheck(backend, b, c, h, w):
    x = noncontiguous(np.random.default_rng(h + 10 * w).standard_normal((b, c, h, w)))
    report = gradcheck_op(pad_right_bottom_forward, pad_right_bottom_backward, [x], full_max=50)
    assert report.passed, report


def test_pad_right_bottom_matches_torch(backend):
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 5))
    y_t, dy, dx_t = _torch_op(lambda t: F.pad(t, (0, 1, 0, 1), mode="constant", value=0.0), x)
    y, cache = pad_right_bottom_forward(asarray(x))
    dx = pad_right_bottom_backward(asarray(dy), cache)
    np.testing.assert_array_equal(to_numpy(y), y_t)
    np.testing.assert_array_equal(to_numpy(dx), dx_t)


# ----------------------------------------------------------------------------- modules
def test_resample_modules_gradcheck(backend):
    x = noncontiguous(np.random.default_rng(5).standard_normal((2, 2, 3, 4)))
    for module, kwargs in [(UpsampleNearest2x(), {}), (UpsampleNearest2x(), {"output_size": (5, 9)}),
                           (PadRightBottom(), {})]:
        report = gradcheck(module, x, full_max=48, **kwargs)
        assert report.passed, report
        assert list(module.state_dict()) == []


class _Upsample2D(Module):
    """The diffusers Upsample2D(use_conv=True) layout, built from our pieces (test-only)."""

    def __init__(self, channels):
        super().__init__()
        self.up = UpsampleNearest2x()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, output_size=None):
        return self.conv(self.up(x, output_size))

    def backward(self, dy):
        return self.up.backward(self.conv.backward(dy))


class _VaeDownsample2D(Module):
    """The diffusers Downsample2D(use_conv=True, padding=0) layout (test-only)."""

    def __init__(self, channels):
        super().__init__()
        self.pad = PadRightBottom()
        self.Conv2d_0 = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.Conv2d_0(self.pad(x))

    def backward(self, dy):
        return self.pad.backward(self.Conv2d_0.backward(dy))


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("output_size", [None, (7, 9)])
def test_upsample2d_composition_matches_diffusers(backend, dtype, rtol, output_size):
    theirs = randomize_(Upsample2D(3, use_conv=True), seed=4)
    x = np.random.default_rng(6).standard_normal((2, 3, 4, 5))
    assert_parity(_Upsample2D(3), theirs, [x], dtype=dtype, rtol=rtol,
                  our_forward=lambda m, a: m(a, output_size),
                  their_forward=lambda m, t: m(t, output_size=output_size))


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("side", [6, 7])
def test_vae_downsample2d_composition_matches_diffusers(backend, dtype, rtol, side):
    theirs = randomize_(Downsample2D(3, use_conv=True, padding=0), seed=5)
    ours = _VaeDownsample2D(3).to(dtype)
    # diffusers registers the conv twice (Conv2d_0 and conv); load the Conv2d_0 copy.
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()
                          if k.startswith("Conv2d_0.")})
    x = np.random.default_rng(side).standard_normal((2, 3, side, side))
    assert_parity(ours, theirs, [x], dtype=dtype, rtol=rtol, load_weights=False)


# ----------------------------------------------------------------------------- errors
def test_resample_ops_reject_bad_input(backend):
    with pytest.raises(ValueError, match=r"upsample_nearest2x: x must be an array of shape \(B, C, H, W\), "
                                         r"got shape \(3, 4\)"):
        upsample_nearest2x_forward(asarray(np.zeros((3, 4))))
    with pytest.raises(ValueError, match=r"output_size must be a pair of positive ints \(Ho, Wo\), got \(0, 4\)"):
        upsample_nearest_forward(asarray(np.zeros((1, 1, 2, 2))), (0, 4))
    with pytest.raises(ValueError, match="output_size must be a pair of positive ints"):
        upsample_nearest2x_forward(asarray(np.zeros((1, 1, 2, 2))), output_size=8)
    with pytest.raises(ValueError, match=r"pad_right_bottom: x must be an array of shape \(B, C, H, W\), got list"):
        pad_right_bottom_forward([[1.0]])
