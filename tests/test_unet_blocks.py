"""U-Net and VAE building blocks: gradient checks, parity with diffusers' twins on randomized
weights (forward, input gradients, every parameter gradient), state-dict keys, errors.

Shared blocks (npdiffusion/models/blocks): ResnetBlock2D, Downsample2D, Upsample2D.
"""
import numpy as np
import pytest
import torch
from diffusers.models.downsampling import Downsample2D as TorchDownsample2D
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D
from diffusers.models.upsampling import Upsample2D as TorchUpsample2D
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.models.blocks.resnet import ResnetBlock2D
from npdiffusion.models.blocks.sampling import Downsample2D, Upsample2D
from npdiffusion.testing import gradcheck, noncontiguous, relative_error
from parity import assert_parity, randomize_


def _state_keys(module):
    return set(module.state_dict())


# ============================================================================ ResnetBlock2D
@given(cin=st.sampled_from([4, 6]), cout=st.sampled_from([4, 6]), temb=st.sampled_from([None, 3]),
       h=st.integers(2, 4), w=st.integers(1, 4), scale=st.sampled_from([1.0, 2.0]),
       shortcut=st.sampled_from([None, True]))
def test_resnet_block_gradcheck(backend, cin, cout, temb, h, w, scale, shortcut):
    # Two groups of >= 2 channels: a group of one channel would remove conv1.bias and the time
    # projection exactly (their true gradients are 0, leaving central differences pure round-off).
    rng = np.random.default_rng(cin * 1000 + cout * 100 + h * 10 + w)
    m = ResnetBlock2D(cin, cout, temb_channels=temb, groups=2, eps=1e-5, output_scale_factor=scale,
                      use_in_shortcut=shortcut).to("float64")
    for _, p in m.named_parameters():                       # move norm gains/biases off 1/0
        p[...] = asarray(rng.standard_normal(p.shape) * 0.5 + (1.0 if p.ndim == 1 else 0.0))
    x = noncontiguous(rng.standard_normal((2, cin, h, w)))
    inputs = [x] if temb is None else [x, noncontiguous(rng.standard_normal((2, temb)))]
    report = gradcheck(m, *inputs, eps=1e-6)
    assert report.passed, report


RESNET_CONFIGS = {
    "same-channels": dict(in_channels=4, out_channels=4, temb_channels=6, groups=2, eps=1e-5),
    "shortcut": dict(in_channels=4, out_channels=6, temb_channels=5, groups=2, eps=1e-5),
    "forced-shortcut-no-bias": dict(in_channels=4, out_channels=4, temb_channels=3, groups=2,
                                    use_in_shortcut=True, conv_shortcut_bias=False),
    "vae-no-temb": dict(in_channels=6, out_channels=4, temb_channels=None, groups=2, eps=1e-6),
    "scaled-output": dict(in_channels=6, out_channels=6, temb_channels=4, groups=3, output_scale_factor=1.7),
}


@pytest.mark.parametrize("config", sorted(RESNET_CONFIGS))
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_resnet_block_matches_diffusers(backend, config, dtype, rtol):
    kw = RESNET_CONFIGS[config]
    theirs = randomize_(TorchResnetBlock2D(**kw), seed=len(config))
    ours = ResnetBlock2D(**kw)
    assert _state_keys(ours) == set(theirs.state_dict())
    rng = np.random.default_rng(len(config))
    x = rng.standard_normal((2, kw["in_channels"], 5, 3))
    if kw["temb_channels"] is None:
        assert_parity(ours, theirs, [x], dtype=dtype, rtol=rtol, their_forward=lambda m, a: m(a, None))
    else:
        temb = rng.standard_normal((2, kw["temb_channels"]))
        assert_parity(ours, theirs, [x, temb], dtype=dtype, rtol=rtol)


def test_resnet_block_checkpointing_is_exact(backend):
    rng = np.random.default_rng(5)
    x, temb = rng.standard_normal((2, 4, 5, 5)), rng.standard_normal((2, 3))
    dy = rng.standard_normal((2, 6, 5, 5))
    results = []
    for ckpt in (False, True):
        m = ResnetBlock2D(4, 6, temb_channels=3, groups=2).to("float64")
        m.load_state_dict({k: rng.standard_normal(v.shape) for k, v in m.state_dict().items()}
                          if not results else results[0][0])
        m.gradient_checkpointing = ckpt
        y = m(asarray(x), asarray(temb))
        dx, dt = m.backward(asarray(dy))
        results.append(({k: to_numpy(v).copy() for k, v in m.state_dict().items()}, y, dx, dt,
                        dict(m.named_grads())))
    (_, y0, dx0, dt0, g0), (_, y1, dx1, dt1, g1) = results
    assert relative_error(y1, y0) <= 1e-12 and relative_error(dx1, dx0) <= 1e-12 and relative_error(dt1, dt0) <= 1e-12
    for k in g0:
        assert relative_error(g1[k], g0[k]) <= 1e-12, k


def test_resnet_block_errors(backend):
    m = ResnetBlock2D(4, 4, temb_channels=3, groups=2)
    x = asarray(np.zeros((1, 4, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="x must have 4 entries on axis 1, got shape"):
        m(asarray(np.zeros((1, 3, 2, 2), dtype=np.float32)), asarray(np.zeros((1, 3), dtype=np.float32)))
    with pytest.raises(ValueError, match="temb .* is required"):
        m(x)
    with pytest.raises(ValueError, match="temb must have 3 entries on axis 1"):
        m(x, asarray(np.zeros((1, 5), dtype=np.float32)))
    with pytest.raises(ValueError, match="temb must have batch size 1"):
        m(x, asarray(np.zeros((2, 3), dtype=np.float32)))
    with pytest.raises(ValueError, match="temb must be None"):
        ResnetBlock2D(4, temb_channels=None, groups=2)(x, asarray(np.zeros((1, 3), dtype=np.float32)))
    with pytest.raises(ValueError, match="num_channels \\(4\\) must be divisible by num_groups \\(3\\)"):
        ResnetBlock2D(4, temb_channels=3, groups=3)
    with pytest.raises(ValueError, match="output_scale_factor must be a nonzero number"):
        ResnetBlock2D(4, groups=2, output_scale_factor=0)
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        ResnetBlock2D(0)


# ============================================================================ Down/Upsample2D
@given(c=st.integers(1, 3), h=st.integers(2, 6), w=st.integers(2, 6), mode=st.sampled_from(["p1", "p0", "pool"]))
def test_downsample_gradcheck(backend, c, h, w, mode):
    rng = np.random.default_rng(c * 100 + h * 10 + w)
    m = Downsample2D(c, use_conv=mode != "pool", out_channels=None if mode == "pool" else 2,
                     padding=0 if mode == "p0" else 1).to("float64")
    x = noncontiguous(rng.standard_normal((2, c, h, w)))
    report = gradcheck(m, x, full_max=60)
    assert report.passed, report


@given(c=st.integers(1, 3), h=st.integers(1, 4), w=st.integers(1, 4), conv=st.booleans(),
       size=st.sampled_from([None, (5, 7), (3, 2)]))
def test_upsample_gradcheck(backend, c, h, w, conv, size):
    rng = np.random.default_rng(c * 100 + h * 10 + w)
    m = Upsample2D(c, use_conv=conv, out_channels=2 if conv else None).to("float64")
    x = noncontiguous(rng.standard_normal((2, c, h, w)))
    report = gradcheck(m, x, full_max=40, output_size=size)
    assert report.passed, report


@pytest.mark.parametrize("kw,shape", [
    (dict(channels=3, use_conv=True, out_channels=5, padding=1), (2, 3, 7, 6)),      # U-Net
    (dict(channels=3, use_conv=True, padding=0), (2, 3, 8, 5)),                      # VAE encoder
    (dict(channels=3, use_conv=True, out_channels=2, padding=2), (1, 3, 4, 4)),
    (dict(channels=3, use_conv=False), (2, 3, 7, 6)),                                # average pool
])
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_downsample_matches_diffusers(backend, kw, shape, dtype, rtol):
    theirs = randomize_(TorchDownsample2D(**kw, name="op"), seed=shape[2])
    ours = Downsample2D(**kw)
    assert _state_keys(ours) == set(theirs.state_dict())
    x = np.random.default_rng(1).standard_normal(shape)
    assert_parity(ours, theirs, [x], dtype=dtype, rtol=rtol)


@pytest.mark.parametrize("conv", [True, False])
@pytest.mark.parametrize("size", [None, (7, 9), (4, 5)])
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_upsample_matches_diffusers(backend, conv, size, dtype, rtol):
    kw = dict(channels=3, use_conv=conv, out_channels=4 if conv else None)
    theirs = randomize_(TorchUpsample2D(**kw), seed=3)
    ours = Upsample2D(**kw)
    assert _state_keys(ours) == set(theirs.state_dict())
    x = np.random.default_rng(2).standard_normal((2, 3, 3, 4))
    assert_parity(ours, theirs, [x], dtype=dtype, rtol=rtol,
                  our_forward=lambda m, a: m(a, size), their_forward=lambda m, a: m(a, size))


def test_sampling_errors(backend):
    x = asarray(np.zeros((1, 3, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="x must have 2 entries on axis 1, got shape"):
        Downsample2D(2)(x)
    with pytest.raises(ValueError, match="out_channels must equal channels"):
        Downsample2D(3, use_conv=False, out_channels=4)
    with pytest.raises(ValueError, match="padding must be a non-negative int"):
        Downsample2D(3, padding=-1)
    with pytest.raises(TypeError, match="use_conv must be a bool"):
        Upsample2D(3, use_conv="yes")
    with pytest.raises(ValueError, match="out_channels must equal channels"):
        Upsample2D(3, use_conv=False, out_channels=4)
    with pytest.raises(ValueError, match="output_size must be a pair of positive ints"):
        Upsample2D(3)(x, (0, 4))
    with pytest.raises(ValueError, match="at least 2x2"):
        Downsample2D(3, use_conv=False)(asarray(np.zeros((1, 3, 1, 4), dtype=np.float32)))
