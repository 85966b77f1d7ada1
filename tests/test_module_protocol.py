"""The module protocol's backward shape, cache lifetime and frozen parameters (npdiffusion/nn/module.py).

Shapes: x (2, 4, 6, 6), temb (2, 5), tokens (2, 9, 4), context (2, 3, 6).
"""
import numpy as np
import pytest

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.models.blocks.resnet import ResnetBlock2D
from npdiffusion.models.unet.transformer_2d import BasicTransformerBlock, Transformer2DModel
from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL
from npdiffusion.nn.attention import Attention
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import frozen
from npdiffusion.ops.conv import conv2d_backward, conv2d_forward
from npdiffusion.ops.linear import linear_backward, linear_forward


def _arrays(rng, *shapes):
    return [asarray(rng.standard_normal(s)) for s in shapes]


@pytest.mark.parametrize("case", ["resnet", "attention", "transformer_block", "transformer_2d"])
def test_backward_has_one_entry_per_array_input_whatever_forward_was_given(backend, case):
    """The same tuple length with and without the optional second input; None when it was absent."""
    rng = np.random.default_rng(0)
    if case == "resnet":
        m, (x, second) = ResnetBlock2D(4, 4, temb_channels=5, groups=2), _arrays(rng, (2, 4, 6, 6), (2, 5))
        plain = ResnetBlock2D(4, 4, temb_channels=None, groups=2)
    elif case == "attention":
        m, (x, second) = Attention(4, cross_attention_dim=4, heads=2, dim_head=2), _arrays(rng, (2, 9, 4), (2, 3, 4))
        plain = m
    elif case == "transformer_block":
        m, (x, second) = BasicTransformerBlock(4, 2, 2, cross_attention_dim=6), _arrays(rng, (2, 9, 4), (2, 3, 6))
        plain = BasicTransformerBlock(4, 2, 2)
    else:
        m, (x, second) = (Transformer2DModel(2, 2, in_channels=4, norm_num_groups=2, cross_attention_dim=6),
                          _arrays(rng, (2, 4, 3, 3), (2, 3, 6)))
        plain = Transformer2DModel(2, 2, in_channels=4, norm_num_groups=2)
    for model in (m, plain):
        model.to("float64")
    y = m(x, second)
    dx, dsecond = m.backward(asarray(rng.standard_normal(y.shape)))
    assert dx.shape == x.shape and dsecond.shape == second.shape
    y = plain(x)
    result = plain.backward(asarray(rng.standard_normal(y.shape)))
    assert isinstance(result, tuple) and len(result) == 2 and result[1] is None
    assert result[0].shape == x.shape


def test_backward_frees_the_cache_and_a_second_backward_raises(backend):
    m = Linear(3, 2).to("float64")
    x = asarray(np.ones((4, 3)))
    m.backward(m(x))
    assert not m._caches
    with pytest.raises(RuntimeError, match="needs a forward in training mode first, and one per backward"):
        m.backward(m.weight[:, :1].T.repeat(4, 0))


def test_encode_and_decode_backward_have_their_own_slots(backend):
    """encode -> decode -> decode_backward -> encode_backward; each backward frees only its own slot."""
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        block_out_channels=[4, 8], norm_num_groups=2, latent_channels=2).to("float64")
    x = asarray(np.random.default_rng(1).standard_normal((1, 3, 8, 8)))
    posterior = vae.encode(x)
    image = vae.decode(posterior.mean)
    assert set(vae._caches) == {"encode", "decode"}
    dz = vae.decode_backward(image)
    assert set(vae._caches) == {"encode"}
    assert vae.encode_backward(dz).shape == x.shape
    assert not vae._caches
    with pytest.raises(RuntimeError, match="encode_backward needs an encode call in training mode"):
        vae.encode_backward(dz)


def test_ops_skip_the_weight_gradient_and_keep_dx_bitwise(backend):
    """weight_grad=False returns the same dx (bitwise) and no dW / db, for every conv2d path."""
    rng = np.random.default_rng(2)
    x, w, b, dy = _arrays(rng, (5, 3), (4, 3), (4,), (5, 4))
    _, cache = linear_forward(x, w, b)
    full, input_only = linear_backward(dy, cache), linear_backward(dy, cache, weight_grad=False)
    assert np.array_equal(to_numpy(full[0]), to_numpy(input_only[0])) and input_only[1:] == (None, None)
    for kernel, stride, padding, batch in ((1, 1, 0, 2), (3, 1, 1, 2), (3, 2, 1, 2), (3, 1, 1, 1)):
        channels = 40 if batch == 1 else 3          # B*H*W < C: the col2im path at stride 1
        x, w, b = _arrays(rng, (batch, channels, 5, 5), (4, channels, kernel, kernel), (4,))
        y, cache = conv2d_forward(x, w, b, stride, padding)
        dy = asarray(rng.standard_normal(y.shape))
        full, input_only = conv2d_backward(dy, cache), conv2d_backward(dy, cache, weight_grad=False)
        assert np.array_equal(to_numpy(full[0]), to_numpy(input_only[0]))
        assert input_only[1:] == (None, None)


def test_frozen_gives_the_input_gradient_and_leaves_parameter_gradients(backend):
    """Inside ``frozen``: the same dx as a full backward, no gradient accumulated, flags restored."""
    rng = np.random.default_rng(3)
    m = ResnetBlock2D(4, 6, temb_channels=5, groups=2).to("float64")
    m.conv1.requires_grad_(False)                     # a setting of the caller, restored as it was
    x, temb = _arrays(rng, (2, 4, 6, 6), (2, 5))
    dy = asarray(rng.standard_normal((2, 6, 6, 6)))
    m(x, temb)
    dx_full, dtemb_full = m.backward(dy)
    before = {k: to_numpy(g).copy() for k, g in m.named_grads()}
    with frozen(m):
        m(x, temb)
        dx, dtemb = m.backward(dy)
    assert np.array_equal(to_numpy(dx), to_numpy(dx_full)) and np.array_equal(to_numpy(dtemb), to_numpy(dtemb_full))
    assert all(np.array_equal(to_numpy(g), before[k]) for k, g in m.named_grads())
    assert [sub.requires_grad for sub in m.modules()] == [sub is not m.conv1 for sub in m.modules()]
    assert not np.any(before["conv1.weight"])         # conv1 was frozen throughout: nothing accumulated


def test_conv_weight_grad_returns_without_accumulating(backend):
    rng = np.random.default_rng(4)
    conv = Conv2d(3, 2, 3, padding=1).to("float64")
    x, dy = _arrays(rng, (1, 3, 4, 4), (1, 2, 4, 4))
    conv(x)
    dw = conv.weight_grad(dy)
    assert conv._grads["weight"] is None
    conv.backward(dy)
    assert np.array_equal(to_numpy(dw), to_numpy(conv._grads["weight"]))


def test_requires_grad_wants_a_bool():
    with pytest.raises(TypeError, match="requires_grad must be a bool, got 0"):
        Linear(2, 2).requires_grad_(0)
