"""VAE blocks (MidBlockAttention, UNetMidBlock2D, DownEncoderBlock2D, UpDecoderBlock2D) and the
Encoder / Decoder: float64 gradient checks, parity with diffusers' twins on randomized weights
(forward, input gradients, every parameter gradient), state-dict keys, errors.

Every group norm here has groups of >= 2 channels, so the only parameter whose true gradient is
exactly zero is an attention's ``to_k.bias`` (softmax ignores a shift shared by all keys); it is
checked absolutely (tests/vae_parity.py)."""
import numpy as np
import pytest
from diffusers.models.attention_processor import Attention as TorchAttention
from diffusers.models.autoencoders.vae import Decoder as TorchDecoder
from diffusers.models.autoencoders.vae import Encoder as TorchEncoder
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D as TorchDownEncoderBlock2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D as TorchUNetMidBlock2D
from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D as TorchUpDecoderBlock2D
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.models.vae.decoder import Decoder
from npdiffusion.models.vae.encoder import Encoder
from npdiffusion.models.vae.vae_blocks import DownEncoderBlock2D, MidBlockAttention, UNetMidBlock2D, UpDecoderBlock2D
from npdiffusion.testing import gradcheck, noncontiguous
from parity import assert_parity, randomize_, torch_threads
from vae_parity import assert_grads_match


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """torch on one thread for these tiny models (see vae_parity.torch_threads)."""
    with torch_threads(1):
        yield


def _randomize_ours(m, seed):
    """Random weights (norm gains around one) so no layer sits at its identity-like init."""
    rng = np.random.default_rng(seed)
    for name, p in m.named_parameters():
        fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 1
        p[...] = asarray(rng.standard_normal(p.shape) * (0.6 / np.sqrt(fan_in) if p.ndim > 1 else 0.3)
                         + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return m


def _parity(ours, theirs, inputs, dtype, rtol, their_forward=None):
    """assert_parity for outputs and input gradients, then every parameter gradient (to_k.bias absolutely)."""
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert_parity(ours, theirs, inputs, dtype=dtype, rtol=rtol, check_param_grads=False, their_forward=their_forward)
    t_grads = {k: p.grad.numpy() for k, p in theirs.named_parameters()}
    assert_grads_match(dict(ours.named_grads()), t_grads, {k for k in t_grads if k.endswith("to_k.bias")}, rtol)


# ============================================================================ MidBlockAttention
# Central differences of sum(g * y) (|sum| ~ 1-20 here) carry ~1e-9 of absolute error at eps 1e-6
# (truncation and round-off), and to_k.bias's true derivative is zero; so directional derivatives
# under FLOOR are checked to ~1e-8 absolute, every larger one to 1e-6 relative.
FLOOR = 1e-2
ATTENTION_CONFIGS = {   # name -> (channels, attention_head_dim, groups, rescale)
    "vae-one-head": (8, 8, 2, 1.0),
    "two-heads-rescaled": (8, 4, 4, 1.7),
    "three-heads": (6, 2, 3, 1.0),
}


@pytest.mark.parametrize("config", sorted(ATTENTION_CONFIGS))
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_mid_block_attention_matches_diffusers(backend, config, dtype, rtol):
    c, hd, g, r = ATTENTION_CONFIGS[config]
    theirs = randomize_(TorchAttention(c, heads=c // hd, dim_head=hd, rescale_output_factor=r, eps=1e-6,
                                       norm_num_groups=g, residual_connection=True, bias=True, upcast_softmax=True,
                                       _from_deprecated_attn_block=True), seed=len(config))
    ours = MidBlockAttention(c, attention_head_dim=hd, norm_num_groups=g, eps=1e-6, rescale_output_factor=r)
    x = np.random.default_rng(len(config)).standard_normal((2, c, 3, 5))
    _parity(ours, theirs, [x], dtype, rtol)


@given(c=st.sampled_from([4, 6]), heads=st.sampled_from([1, 2]), h=st.integers(1, 3), w=st.integers(2, 3),
       rescale=st.sampled_from([1.0, 2.5]), chunk=st.sampled_from([None, 2]))
def test_mid_block_attention_gradcheck(backend, c, heads, h, w, rescale, chunk):
    rng = np.random.default_rng(c * 100 + heads * 10 + h * 3 + w)
    m = _randomize_ours(MidBlockAttention(c, attention_head_dim=c // heads, norm_num_groups=2,
                                          rescale_output_factor=rescale, chunk_size=chunk).to("float64"), c + h)
    x = noncontiguous(rng.standard_normal((2, c, h, w)))
    report = gradcheck(m, x, floor=FLOOR)
    assert report.passed, report


# ============================================================================ UNetMidBlock2D
MID_CONFIGS = {
    "vae": dict(in_channels=8, temb_channels=None, resnet_groups=2, attention_head_dim=8),
    "two-layers-two-heads-scaled": dict(in_channels=8, temb_channels=None, num_layers=2, resnet_groups=4,
                                        attention_head_dim=4, output_scale_factor=1.5),
    "temb": dict(in_channels=6, temb_channels=5, resnet_groups=3, attention_head_dim=3),
    "no-attention": dict(in_channels=4, temb_channels=None, resnet_groups=2, add_attention=False, num_layers=2),
    "attn-groups": dict(in_channels=8, temb_channels=None, resnet_groups=2, attn_groups=4, attention_head_dim=8),
}


@pytest.mark.parametrize("config", sorted(MID_CONFIGS))
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_unet_mid_block_matches_diffusers(backend, config, dtype, rtol):
    kw = MID_CONFIGS[config]
    theirs = randomize_(TorchUNetMidBlock2D(**kw), seed=len(config))
    ours = UNetMidBlock2D(**kw)
    rng = np.random.default_rng(len(config))
    inputs = [rng.standard_normal((2, kw["in_channels"], 4, 3))]
    if kw["temb_channels"] is not None:
        inputs.append(rng.standard_normal((2, kw["temb_channels"])))
    _parity(ours, theirs, inputs, dtype, rtol)


@given(layers=st.integers(1, 2), attention=st.booleans(), temb=st.sampled_from([None, 3]), h=st.integers(2, 3),
       w=st.integers(1, 3))
def test_unet_mid_block_gradcheck(backend, layers, attention, temb, h, w):
    rng = np.random.default_rng(layers * 100 + h * 10 + w + (temb or 0))
    m = _randomize_ours(UNetMidBlock2D(4, temb_channels=temb, num_layers=layers, resnet_groups=2,
                                       add_attention=attention, attention_head_dim=4).to("float64"), h * w)
    inputs = [noncontiguous(rng.standard_normal((2, 4, h, w)))]
    if temb is not None:
        inputs.append(noncontiguous(rng.standard_normal((2, temb))))
    report = gradcheck(m, *inputs, floor=FLOOR, directions=2)
    assert report.passed, report


# ============================================================================ down / up blocks
DOWN_CONFIGS = {
    "vae-pad0": dict(in_channels=4, out_channels=6, num_layers=2, resnet_groups=2, downsample_padding=0),
    "last-no-downsample": dict(in_channels=6, out_channels=6, num_layers=1, resnet_groups=3, add_downsample=False),
    "pad1-scaled": dict(in_channels=4, out_channels=4, num_layers=1, resnet_groups=2, downsample_padding=1,
                        output_scale_factor=1.3),
}
UP_CONFIGS = {
    "vae": dict(in_channels=6, out_channels=4, num_layers=3, resnet_groups=2),
    "last-no-upsample": dict(in_channels=4, out_channels=4, num_layers=2, resnet_groups=2, add_upsample=False),
}


@pytest.mark.parametrize("config", sorted(DOWN_CONFIGS))
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_down_encoder_block_matches_diffusers(backend, config, dtype, rtol):
    kw = DOWN_CONFIGS[config]
    theirs = randomize_(TorchDownEncoderBlock2D(**kw), seed=len(config))
    x = np.random.default_rng(len(config)).standard_normal((2, kw["in_channels"], 7, 6))   # odd side floors
    _parity(DownEncoderBlock2D(**kw), theirs, [x], dtype, rtol)


@pytest.mark.parametrize("config", sorted(UP_CONFIGS))
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_up_decoder_block_matches_diffusers(backend, config, dtype, rtol):
    kw = UP_CONFIGS[config]
    theirs = randomize_(TorchUpDecoderBlock2D(**kw), seed=len(config))
    x = np.random.default_rng(len(config)).standard_normal((2, kw["in_channels"], 3, 4))
    _parity(UpDecoderBlock2D(**kw), theirs, [x], dtype, rtol)


@given(down=st.booleans(), layers=st.integers(1, 2), h=st.integers(2, 5), w=st.integers(2, 4))
def test_down_and_up_blocks_gradcheck(backend, down, layers, h, w):
    rng = np.random.default_rng(layers * 100 + h * 10 + w + down)
    if down:
        m = DownEncoderBlock2D(4, 6, num_layers=layers, resnet_groups=2, downsample_padding=0)
    else:
        m = UpDecoderBlock2D(6, 4, num_layers=layers, resnet_groups=2)
    m = _randomize_ours(m.to("float64"), h + w)
    report = gradcheck(m, noncontiguous(rng.standard_normal((2, 4 if down else 6, h, w))), floor=FLOOR, directions=2)
    assert report.passed, report


# ============================================================================ Encoder / Decoder
CODER = dict(block_out_channels=(4, 6), layers_per_block=1, norm_num_groups=2)


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_encoder_and_decoder_match_diffusers(backend, dtype, rtol):
    enc_kw = dict(CODER, in_channels=3, out_channels=2, down_block_types=["DownEncoderBlock2D"] * 2)
    dec_kw = dict(CODER, in_channels=2, out_channels=3, up_block_types=["UpDecoderBlock2D"] * 2)
    rng = np.random.default_rng(0)
    _parity(Encoder(**enc_kw), randomize_(TorchEncoder(**enc_kw), seed=1), [rng.standard_normal((2, 3, 8, 6))],
            dtype, rtol)
    _parity(Decoder(**dec_kw), randomize_(TorchDecoder(**dec_kw), seed=2), [rng.standard_normal((2, 2, 3, 4))],
            dtype, rtol)


def test_encoder_and_decoder_gradcheck(backend):
    rng = np.random.default_rng(7)
    enc = _randomize_ours(Encoder(3, 2, ["DownEncoderBlock2D"] * 2, **CODER).to("float64"), 1)
    dec = _randomize_ours(Decoder(2, 3, ["UpDecoderBlock2D"] * 2, **CODER).to("float64"), 2)
    for m, x in ((enc, rng.standard_normal((1, 3, 4, 6))), (dec, rng.standard_normal((1, 2, 2, 3)))):
        report = gradcheck(m, noncontiguous(x), floor=FLOOR, directions=1)
        assert report.passed, report


# ============================================================================ errors
def test_block_errors(backend):
    with pytest.raises(ValueError, match=r"MidBlockAttention: x must have 8 entries on axis 1, got shape \(1, 4, 2, 2\)"):
        MidBlockAttention(8, norm_num_groups=2)(asarray(np.zeros((1, 4, 2, 2))))
    with pytest.raises(ValueError, match=r"channels \(6\) must be divisible by attention_head_dim \(4\)"):
        MidBlockAttention(6, attention_head_dim=4)
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        DownEncoderBlock2D(4, 4, num_layers=0, resnet_groups=2)
    with pytest.raises(ValueError, match="resnet_act_fn must be 'swish' or 'silu', got 'gelu'"):
        UpDecoderBlock2D(4, 4, resnet_groups=2, resnet_act_fn="gelu")
    with pytest.raises(ValueError, match=r"UNetMidBlock2D: x must have 4 entries on axis 1"):
        UNetMidBlock2D(4, resnet_groups=2, attention_head_dim=4)(asarray(np.zeros((1, 2, 2, 2))))
    with pytest.raises(ValueError, match=r"Decoder: z must have 2 entries on axis 1, got shape \(1, 3, 2, 2\)"):
        Decoder(2, 3, ["UpDecoderBlock2D"] * 2, **CODER)(asarray(np.zeros((1, 3, 2, 2))))
    with pytest.raises(ValueError, match="only norm_type 'group' is supported"):
        Decoder(2, 3, ["UpDecoderBlock2D"] * 2, norm_type="spatial", **CODER)
    m = UNetMidBlock2D(4, resnet_groups=2, attention_head_dim=4).eval()
    m(asarray(np.zeros((1, 4, 2, 2))))
    with pytest.raises(RuntimeError, match="needs a forward in training mode first"):
        m.backward(asarray(np.zeros((1, 4, 2, 2))))
    assert to_numpy(m(asarray(np.ones((1, 4, 2, 2))))).shape == (1, 4, 2, 2)
